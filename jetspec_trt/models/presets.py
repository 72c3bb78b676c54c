"""Named model shapes, and random-weight checkpoints of them (the quickstart's tiny pair, Qwen3-8B for benches).

Speed does not depend on weight values, so the benches measure the exact Qwen3-8B shape with random weights;
the tiny pair lets the whole pipeline run on a laptop CPU with nothing downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.draft import default_target_layer_ids

# Byte-level tokenizer specials of the tiny preset, in id order after the 256 byte tokens.
TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class PairShape:
    """A Qwen3 target shape plus the draft head trained for it."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    draft_layers: int
    block_size: int
    mask_token_id: int
    eos_token_id: int
    # Weight std of random checkpoints. The tiny preset uses a large one so that its greedy text varies from
    # token to token (small weights make a random model repeat one token, which would test nothing).
    init_std: float = 0.02

    def target_config(self) -> dict:
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "attention_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "bfloat16",
        }

    def draft_config(self) -> dict:
        config = self.target_config() | {
            "architectures": ["DFlashDraftModel"],
            "num_hidden_layers": self.draft_layers,
            "tie_word_embeddings": False,
            "block_size": self.block_size,
            "num_target_layers": self.num_layers,
            "dflash_config": {
                "target_layer_ids": default_target_layer_ids(self.num_layers, self.draft_layers),
                "mask_token_id": self.mask_token_id,
                "causal_head": True,
            },
        }
        config.pop("eos_token_id")
        return config


PRESETS: dict[str, PairShape] = {
    # Qwen3-8B and the published JetSpec head for it (5 layers, block 16: about 1.05B parameters with fc).
    "qwen3-8b": PairShape(4096, 12288, 36, 32, 8, 128, 151936, 40960, 1000000.0, False, 5, 16, 151669, 151645),
    # The default real pair's shape (Qwen2.5-Coder-0.5B, tied embeddings) with a 1-layer head, in Qwen3 layers:
    # for timing the engine at the size where a round is launch-bound (Qwen2's q/k/v bias and Qwen3's q/k norm
    # cost about the same).
    "qwen2.5-0.5b": PairShape(896, 4864, 24, 14, 2, 64, 151936, 32768, 1000000.0, True, 1, 16, 151654, 151645),
    # A tiny Qwen3 with a byte-level vocabulary, for the quickstart and the tests.
    "tiny": PairShape(128, 256, 6, 4, 2, 32, 256 + len(TINY_SPECIALS), 2048, 10000.0, True, 2, 8, 259, 258, 0.15),
}


def preset(name: str) -> PairShape:
    if name not in PRESETS:
        raise JetSpecError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def random_state(names_and_shapes: dict[str, tuple[int, ...]], seed: int, std: float) -> dict[str, torch.Tensor]:
    """Normal weights (norm weights 1), deterministic in `seed`."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in names_and_shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.randn(shape, generator=generator) * std
    return state


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + ChatML specials. Needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(TINY_SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", mask_token="<|mask|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _byte_of(ch: str) -> int:
    # GPT-2's bytes_to_unicode maps printable bytes to themselves and the rest to 256 + k.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inverse = {v: k for k, v in bytes_to_unicode().items()}
    return inverse[ch]


def write_random_pair(name: str | PairShape, target_dir: Path, draft_dir: Path, seed: int = 0) -> None:
    """Write a random-weight target (with tokenizer for the tiny preset) and draft head in HF layout."""
    from jetspec_trt.models.checkpoint import meta_shapes

    shape = preset(name) if isinstance(name, str) else name
    for directory, config, offset in ((target_dir, shape.target_config(), 0), (draft_dir, shape.draft_config(), 1)):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shapes = meta_shapes(directory)
        state = random_state(shapes, seed + offset, shape.init_std)
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(directory / "model.safetensors"))
    if name == "tiny":
        tiny_tokenizer().save_pretrained(str(target_dir))
        (Path(target_dir) / "generation_config.json").write_text(
            json.dumps({"eos_token_id": shape.eos_token_id, "pad_token_id": 256}, indent=2) + "\n"
        )


def random_models(name: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight target and draft head of a preset's shape, made directly on `device` (nothing to load)."""
    from transformers import Qwen3Config

    from jetspec_trt.models.config import DecoderConfig, rope_inverse_frequencies
    from jetspec_trt.models.draft import DraftHead, DraftSpec
    from jetspec_trt.models.target import TargetModel

    shape = preset(name)
    target_hf = Qwen3Config(**shape.target_config())
    draft_raw = shape.draft_config()
    target_cfg = DecoderConfig.from_hf(target_hf)
    draft_cfg = DecoderConfig.from_hf(Qwen3Config(**draft_raw))
    spec = DraftSpec.from_config_dict(draft_raw, name)
    inv_freq, scaling = rope_inverse_frequencies(target_hf, target_cfg.head_dim)
    with torch.device("meta"):
        target = TargetModel(target_cfg, inv_freq, scaling)
        draft = DraftHead(draft_cfg, spec, inv_freq, scaling)
    generator = torch.Generator(device=device).manual_seed(seed)
    for model in (target, draft):
        model.to_empty(device=device)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, shape.init_std, generator=generator)
        model.rotary.inv_freq = inv_freq.float().to(device)
        model.to(dtype).eval()
    if shape.tie_word_embeddings:
        target.lm_head.weight = target.embed_tokens.weight
    return target, draft, target_hf
