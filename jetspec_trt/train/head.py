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


def head_decoder_config(target: DecoderConfig, num_layers: int, intermediate_size: int | None = None,
                        num_kv_heads: int | None = None) -> DecoderConfig:
    """The head's decoder shape: the target's layers, with two knobs the published format allows.

    intermediate_size: the MLP width. At a small target the head's file size, not its speed, limits its depth,
    and a narrower MLP buys a layer.
    num_kv_heads: at block positions past the anchor the first layer's queries carry no content (the MASK
    embedding at a position), so everything a draft token knows arrives through attention values: with a
    small target's GQA (Qwen2.5-0.5B: 2 KV heads of 64) that is 128 dimensions per source token for all 14
    query heads. More KV heads (up to one per query head) widen that path for a few MB of k/v projections.
    """
    if num_layers < 1:
        raise JetSpecError(f"--num-layers must be >= 1, got {num_layers}")
    kv_heads = num_kv_heads or target.num_kv_heads  # (>= 1: TrainConfig.validate)
    if target.num_heads % kv_heads:
        raise JetSpecError(f"--num-kv-heads {kv_heads} must divide the {target.num_heads} attention heads")
    return dataclasses.replace(target, model_type="qwen3", num_layers=num_layers, qkv_bias=False, qk_norm=True,
                               tie_word_embeddings=False, num_kv_heads=kv_heads,
                               intermediate_size=intermediate_size or target.intermediate_size,
                               rope_parameters={"rope_type": "default", "rope_theta": rope_theta(target)})


def rope_theta(cfg: DecoderConfig) -> float:
    return float(cfg.rope_parameters.get("rope_theta", 10000.0))


def plain_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """Exactly what rope_inverse_frequencies computes for the saved config (rope_type default)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def new_head(target: TargetModel, num_layers: int, block_size: int, layer_ids: tuple[int, ...],
             mask_token_id: int, generator: torch.Generator, intermediate_size: int | None = None,
             num_kv_heads: int | None = None) -> DraftHead:
    """A randomly initialised head: Linear weights normal(0, 0.02), norm weights 1 (float32, on CPU)."""
    if block_size < 2:
        raise JetSpecError(f"--block-size must be >= 2, got {block_size}")
    tcfg = target.config
    cfg = head_decoder_config(tcfg, num_layers, intermediate_size, num_kv_heads)
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
    intermediate_size: int
    num_kv_heads: int


def init_head_shape(head_dir: Path, target_dir: Path, num_layers: int, block_size: int, target_layer_ids: str,
                    mask_token_id: int | None, intermediate_size: int | None = None,
                    num_kv_heads: int | None = None) -> HeadShape:
    """The shape of a trained head to continue training from, checked against the target (the same checks as
    `jetspec-trt build`) and against the shape flags, which must agree with it or stay at their defaults
    (num_layers 1, block_size 16, target_layer_ids 'auto', mask_token_id None). A larger --num-layers grows
    the head (load_head_weights adds the new layers as identities); a smaller --intermediate-size narrows its
    MLPs (load_head_weights keeps the strongest neurons); a --num-kv-heads that is a multiple of the head's
    widens its attention (each stored KV head repeated over its query group)."""
    from jetspec_trt.builders.validate import check_pair

    pair = check_pair(target_dir, head_dir)
    spec = pair.spec
    stored_width = pair.draft.intermediate_size
    if intermediate_size is not None and not 1 <= intermediate_size <= stored_width:
        raise JetSpecError(f"--intermediate-size {intermediate_size}: --init-head {head_dir} has MLPs of width "
                           f"{stored_width}, which can be narrowed (1..{stored_width}) but not widened")
    stored_kv, heads = pair.draft.num_kv_heads, pair.draft.num_heads
    if num_kv_heads is not None and (num_kv_heads % stored_kv or heads % num_kv_heads):
        raise JetSpecError(f"--num-kv-heads {num_kv_heads}: --init-head {head_dir} has {stored_kv} KV heads for "
                           f"{heads} attention heads; widen to a multiple of {stored_kv} that divides {heads}")
    shape = HeadShape(pair.draft.num_layers, spec.block_size, tuple(spec.target_layer_ids), spec.mask_token_id,
                      intermediate_size or stored_width, num_kv_heads or stored_kv)
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


def load_head_weights(head: DraftHead, head_dir: Path) -> list[str]:
    """Load a trained head's tensors into `head` (same shape, checked; each cast to the head's dtype), reshaped
    where `head` is wider or deeper; returns what was reshaped, in words (for the training card).

    A head with more layers than the checkpoint grows: the stored layers fill the first ones, and each new
    layer keeps its random init but with zero o_proj and down_proj, so it adds nothing to the residual stream
    and the grown head computes exactly what the trained one did; training then decides what it adds.
    A head with narrower MLPs than the checkpoint keeps each layer's strongest neurons (narrow_mlp); one with
    more KV heads computes exactly what the stored one did (widen_kv_heads)."""
    from jetspec_trt.models.checkpoint import load_checked, read_state_dict

    cfg = head.config
    dtype = next(head.parameters()).dtype
    state = {name: t.to(dtype) for name, t in read_state_dict(head_dir).items()}
    notes = []
    if narrow_mlp(state, cfg.intermediate_size):
        notes.append(f"MLPs narrowed to their {cfg.intermediate_size} strongest neurons")
    widened = widen_kv_heads(state, cfg.num_kv_heads, cfg.head_dim)
    if widened:
        notes.append(f"KV heads widened {widened} -> {cfg.num_kv_heads} (each repeated over its query group: "
                     "the same function at start)")
    stored = 1 + max((int(name.split(".")[1]) for name in state if name.startswith("layers.")), default=-1)
    grown = list(range(stored, len(head.layers)))
    for name, tensor in head.state_dict().items():
        if name.startswith("layers.") and int(name.split(".")[1]) in grown:
            zero = name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))
            state[name] = torch.zeros_like(tensor) if zero else tensor.clone()
    if grown:
        notes.insert(0, f"grown by layers {grown} (zero o_proj/down_proj: identities at start)")
    load_checked(head, state, head_dir)
    return notes


def widen_kv_heads(state: dict[str, torch.Tensor], num_kv_heads: int, head_dim: int) -> int:
    """Give every layer of `state` `num_kv_heads` KV heads by repeating each stored one over the query heads
    it served: query head h reads KV head h // (heads / kv), so with r times the KV heads new head j must be
    stored head j // r. In place; returns the stored KV head count if it widened, else 0."""
    widened = 0
    for name in [n for n in state if n.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight"))]:
        weight = state[name]
        stored = weight.shape[0] // head_dim
        if stored == num_kv_heads:
            continue
        repeat = num_kv_heads // stored
        state[name] = weight.view(stored, head_dim, -1).repeat_interleave(repeat, dim=0).reshape(-1, weight.shape[1])
        widened = stored
    return widened


def narrow_mlp(state: dict[str, torch.Tensor], width: int) -> bool:
    """Keep, in every layer's MLP of `state`, the `width` neurons with the largest contribution bound
    |gate row| * |up row| * |down column|: a neuron's output is down[:, j] * silu(gate_j . x) * (up_j . x), so
    this ranks what dropping it can change (a neuron whose down column is zero changes nothing when dropped).
    Neurons keep their order. In place; returns whether it narrowed (a no-op at the stored width)."""
    narrowed = False
    for name in [n for n in state if n.endswith("mlp.down_proj.weight")]:
        prefix = name[: -len("down_proj.weight")]
        gate, up, down = state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"], state[name]
        if down.shape[1] <= width:
            continue
        score = gate.float().norm(dim=1) * up.float().norm(dim=1) * down.float().norm(dim=0)
        keep = score.topk(width).indices.sort().values
        state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"] = gate[keep], up[keep]
        state[name] = down[:, keep]
        narrowed = True
    return narrowed


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(False)
