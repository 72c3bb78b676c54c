"""A fresh draft head for a target: its config, layer ids, mask token and initial weights.

The head is a Qwen3-style decoder stack (q/k norm, no q/k/v bias, whatever the target's family) sized like
the target's layers, so the published "DFlash format" config describes it and `load_draft` rebuilds it
exactly. Its RoPE is the plain (unscaled) one at the target's theta: that is what the saved config encodes,
so training and inference rotate identically.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path

import torch
from torch import nn

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.config import DecoderConfig
from jetspec_trt.models.draft import DraftHead, DraftSpec, default_target_layer_ids
from jetspec_trt.models.target import TargetModel

INIT_STD = 0.02
# Reserved tokens a chat response never contains, in order of preference, for when the tokenizer declares no
# mask token. Qwen2.5/Qwen3 carry the vision placeholders even in text-only checkpoints.
RESERVED_MASK_TOKENS = ("<|MASK|>", "<|mask|>", "<|vision_pad|>", "<|fim_pad|>", "<|reserved_special_token_0|>")


def parse_layer_ids(text: str, num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """'auto' (evenly spaced, the published heads' rule) or a comma list such as '1,5,9'."""
    if text.strip() == "auto":
        return tuple(default_target_layer_ids(num_target_layers, num_draft_layers))
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise JetSpecError(f"--target-layer-ids must be 'auto' or comma-separated integers, got {text!r}") from None
    if not ids or len(set(ids)) != len(ids) or not all(0 <= i < num_target_layers for i in ids):
        raise JetSpecError(
            f"--target-layer-ids {text!r} must be distinct layer indices in 0..{num_target_layers - 1}"
        )
    return ids


def choose_mask_token(tokenizer, vocab_size: int, explicit: int | None) -> int:
    """The id fed at block positions 1..B-1: explicit, else the tokenizer's mask token, else a reserved one."""
    if explicit is not None:
        if not 0 <= explicit < vocab_size:
            raise JetSpecError(f"--mask-token-id {explicit} is outside the vocab (size {vocab_size})")
        return explicit
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id < vocab_size:
        return int(tokenizer.mask_token_id)
    vocab = tokenizer.get_vocab()
    for name in RESERVED_MASK_TOKENS:
        if name in vocab and vocab[name] < vocab_size:
            return int(vocab[name])
    raise JetSpecError("the tokenizer has no mask token and none of the reserved tokens "
                       f"{', '.join(RESERVED_MASK_TOKENS)}; pass --mask-token-id")


def head_decoder_config(target: DecoderConfig, num_layers: int) -> DecoderConfig:
    if num_layers < 1:
        raise JetSpecError(f"--num-layers must be >= 1, got {num_layers}")
    return dataclasses.replace(target, model_type="qwen3", num_layers=num_layers, qkv_bias=False, qk_norm=True,
                               tie_word_embeddings=False,
                               rope_parameters={"rope_type": "default", "rope_theta": rope_theta(target)})


def rope_theta(cfg: DecoderConfig) -> float:
    return float(cfg.rope_parameters.get("rope_theta", 10000.0))


def plain_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """Exactly what rope_inverse_frequencies computes for the saved config (rope_type default)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def new_head(target: TargetModel, num_layers: int, block_size: int, layer_ids: tuple[int, ...],
             mask_token_id: int, generator: torch.Generator) -> DraftHead:
    """A randomly initialised head: Linear weights normal(0, 0.02), norm weights 1 (float32, on CPU)."""
    if block_size < 2:
        raise JetSpecError(f"--block-size must be >= 2, got {block_size}")
    tcfg = target.config
    cfg = head_decoder_config(tcfg, num_layers)
    spec = DraftSpec(block_size=block_size, num_target_layers=tcfg.num_layers, target_layer_ids=tuple(layer_ids),
                     mask_token_id=mask_token_id, target_hidden_size=tcfg.hidden_size)
    head = DraftHead(cfg, spec, plain_inv_freq(rope_theta(cfg), cfg.head_dim))
    for name, param in head.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    return head


def warm_start_from_target(head: DraftHead, target: TargetModel) -> list[str]:
    """Copy the last len(head.layers) target layers into the head wherever names and shapes agree.

    Returns the copied tensor names. Biases of a Qwen2 target have no place in the head and are dropped;
    q/k norms the target lacks stay at 1.
    """
    copied = []
    first = len(target.layers) - len(head.layers)
    for i, layer in enumerate(head.layers):
        source = dict(target.layers[first + i].named_parameters())
        for name, param in layer.named_parameters():
            if name in source and source[name].shape == param.shape:
                with torch.no_grad():
                    param.copy_(source[name].to(param.dtype))
                copied.append(f"layers.{i}.{name}")
    return copied


@dataclasses.dataclass(frozen=True)
class HeadShape:
    num_layers: int
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int


def init_head_shape(head_dir: Path, target_dir: Path, num_layers: int, block_size: int, target_layer_ids: str,
                    mask_token_id: int | None) -> HeadShape:
    """The shape of a trained head to continue training from, checked against the target (the same checks as
    `jetspec-trt build`) and against the shape flags, which must agree with it or stay at their defaults
    (num_layers 1, block_size 16, target_layer_ids 'auto', mask_token_id None). A larger --num-layers grows
    the head (load_head_weights adds the new layers as identities)."""
    from jetspec_trt.builders.validate import check_pair

    pair = check_pair(target_dir, head_dir)
    spec = pair.spec
    shape = HeadShape(pair.draft.num_layers, spec.block_size, tuple(spec.target_layer_ids), spec.mask_token_id)
    ids = None if target_layer_ids.strip() == "auto" else parse_layer_ids(target_layer_ids, spec.num_target_layers,
                                                                            shape.num_layers)
    if num_layers > shape.num_layers:
        shape = dataclasses.replace(shape, num_layers=num_layers)
    for flag, given, default, have in (("--num-layers", num_layers, 1, shape.num_layers),
                                       ("--block-size", block_size, 16, shape.block_size),
                                       ("--target-layer-ids", ids, None, shape.target_layer_ids),
                                       ("--mask-token-id", mask_token_id, None, shape.mask_token_id)):
        if given != default and given != have:
            raise JetSpecError(f"--init-head {head_dir} has {flag} {have}, not {given}; drop {flag} or make it agree")
    return shape


def load_head_weights(head: DraftHead, head_dir: Path) -> list[int]:
    """Load a trained head's tensors into `head` (same shape, checked; each cast to the head's dtype).

    A head with more layers than the checkpoint grows: the stored layers fill the first ones, and each new
    layer keeps its random init but with zero o_proj and down_proj, so it adds nothing to the residual stream
    and the grown head computes exactly what the trained one did; training then decides what it adds.
    Returns the indices of the new layers."""
    from jetspec_trt.models.checkpoint import load_checked, read_state_dict

    dtype = next(head.parameters()).dtype
    state = {name: t.to(dtype) for name, t in read_state_dict(head_dir).items()}
    stored = 1 + max((int(name.split(".")[1]) for name in state if name.startswith("layers.")), default=-1)
    grown = list(range(stored, len(head.layers)))
    for name, tensor in head.state_dict().items():
        if name.startswith("layers.") and int(name.split(".")[1]) in grown:
            zero = name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))
            state[name] = torch.zeros_like(tensor) if zero else tensor.clone()
    load_checked(head, state, head_dir)
    return grown


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(False)
