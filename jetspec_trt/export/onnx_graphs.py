"""Export-friendly wrappers of the target and the draft head: contiguous KV in, present KV out.

The serving models keep K/V in a paged cache that they write in place; ONNX graphs (and the TensorRT engines
built from them) instead take each layer's past K/V as inputs `past_key_{i}` / `past_value_{i}`
[1, Hkv, past, D] and return `present_key_{i}` / `present_value_{i}` [1, Hkv, past + new, D]; the caller keeps
the rows it commits. The wrappers own no weights and write no layer code: they run the models' own passes
(TargetModel.run_layers, DraftHead.context_key_values and DraftHead.run_layers), whose layers run their own body
around the attention (DecoderLayer.attention_inputs / finish: norms, projections, q/k norm, RoPE, o_proj, MLP,
residuals). Only the KV plumbing (`ContiguousKV`: past + new -> present) and the attention op are written here:

  * `standard`: masked softmax attention from plain ONNX ops (MatMul, Softmax, Where); the visibility
    [new, past + new] is built once per graph from the past length and the packed tree mask.
  * `plugin`: one `jetspec_trt.TreeAttention` node per layer (contract in jetspec_trt/plugins/onnx_op.py),
    which TensorRT maps onto the plugin of the same name.

Target verify graph (`TargetVerifyGraph`): prefill, one decode step and a tree verify are the same graph.
    in   input_ids int64 [T], position_ids int64 [T] (RoPE positions: past + tree depth), tree_mask int32
         [T, ceil(T/32)] (packed ancestor mask), past_key_{i}/past_value_{i} [1, Hkv, P, D] for every layer
    out  logits float32 [T, V], hidden_states [T, len(target_layer_ids) * H] (the target-layer features the
         draft head reads), present_key_{i}/present_value_{i} [1, Hkv, P + T, D]

Draft graph (`DraftGraph`): appends newly committed tokens' features to the head's context and drafts a block.
    in   hidden_states [C, len(ids) * H] (features of the C tokens committed since the last call),
         context_position_ids int64 [C], input_ids int64 [B] (anchor, MASK x (B-1)), position_ids int64 [B],
         tree_mask int32 [B, ceil(B/32)] (causal for a JetSpec head), past_key_{i}/past_value_{i}
         [1, Hkv, P, D] for every head layer
    out  logits float32 [B-1, V] (row d-1 scores depth d), present_key_{i}/present_value_{i} [1, Hkv, P + C, D]
         (the context only: the block's K/V are not kept)
The head owns no embedding or LM head; the draft graph carries copies of the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.target import DecoderLayer, TargetModel

ATTENTION_KINDS = ("standard", "plugin")
NEG_INF = float("-inf")


def unpack_tree_mask(packed: torch.Tensor, num_new: int) -> torch.Tensor:
    """Packed int32 [T, W] -> bool [T, num_new], exact in int64 with Mod and a comparison only (ONNX BitShift
    takes no signed ints, and exporters lower integer floor division through float32): bit b of w is set
    when w mod 2^(b+1) >= 2^b."""
    words = packed.to(torch.int64)
    words = torch.where(words < 0, words + 2**32, words)  # the raw 32-bit words as 0 .. 2^32-1
    powers = torch.tensor([2**b for b in range(32)], dtype=torch.int64, device=packed.device)
    bits = torch.remainder(words.unsqueeze(-1), powers * 2) >= powers  # [T, W, 32]
    return bits.flatten(1)[:, :num_new]


def standard_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """q [T, Hq, D], key/value [1, Hkv, S, D], visible bool [T, S] -> [T, Hq, D]; fp32 softmax like the op."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads

    def heads(x):  # [1, Hkv, S, D] -> [Hq, S, D], query head h reading KV head h // group
        return x[0].unsqueeze(1).expand(-1, group, -1, -1).reshape(num_heads, -1, head_dim).float()

    scores = torch.matmul(q.float().transpose(0, 1), heads(key).transpose(1, 2)) * scale  # [Hq, T, S]
    scores = torch.where(visible.unsqueeze(0), scores, NEG_INF)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, heads(value)).transpose(0, 1).to(q.dtype)


class Attend:
    """The attention of every layer of one graph call: the mask work is done once, here."""

    def __init__(self, kind: str, tree_mask: torch.Tensor, num_new: int, past: torch.Tensor):
        self.kind = kind
        past_len = past.shape[2]
        if kind == "standard":
            committed = torch.ones(num_new, past_len, dtype=torch.bool, device=tree_mask.device)
            self.visible = torch.cat([committed, unpack_tree_mask(tree_mask, num_new)], dim=1)
        else:
            # The past length as an int32 [1] tensor, computed from the KV input's shape.
            self.ctx_len = torch.ones(1, dtype=torch.int32, device=tree_mask.device) * past_len
            self.tree_mask = tree_mask

    def __call__(self, q, key, value, scale):
        if self.kind == "standard":
            return standard_attention(q, key, value, self.visible, scale)
        return torch.ops.jetspec_trt.onnx_tree_attention(q, key, value, self.ctx_len, self.tree_mask, scale)


def append_kv(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """past [1, Hkv, P, D] + new [T, Hkv, D] -> [1, Hkv, P + T, D]."""
    return torch.cat([past, new.transpose(0, 1).unsqueeze(0).to(past.dtype)], dim=2)


class ContiguousKV:
    """A models.target.LayerCall over contiguous K/V for one graph call of num_new tokens: layer i's new K/V are
    appended to its past (past_key_values[2i], [2i+1]), the layer attends over past + new (`kind` attention,
    packed `tree_mask` among the new tokens) and the presents are kept in `presents` (key_0, value_0, key_1, ...).
    The layer body around the attention is the layer's own."""

    def __init__(self, past_key_values, kind: str, tree_mask: torch.Tensor, num_new: int):
        self.past = past_key_values
        self.attend = Attend(kind, tree_mask, num_new, past_key_values[0])
        self.presents: list[torch.Tensor] = []

    def __call__(self, i: int, layer: DecoderLayer, x, cos, sin):
        q, k, v = layer.attention_inputs(x, cos, sin)
        key, value = append_kv(self.past[2 * i], k), append_kv(self.past[2 * i + 1], v)
        self.presents += [key, value]
        return layer.finish(x, self.attend(q, key, value, layer.self_attn.scale))


def _check_kind(kind: str) -> None:
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    if kind == "plugin":
        import jetspec_trt.plugins.onnx_op  # noqa: F401  (defines torch.ops.jetspec_trt.onnx_tree_attention)


class TargetVerifyGraph(nn.Module):
    def __init__(self, target: TargetModel, capture_layers: tuple[int, ...], attention: str = "standard"):
        super().__init__()
        _check_kind(attention)
        self.target = target
        self.capture_layers = tuple(capture_layers)
        self.attention = attention

    def forward(self, input_ids, position_ids, tree_mask, *past_key_values):
        layers = ContiguousKV(past_key_values, self.attention, tree_mask, input_ids.shape[0])
        x, features = self.target.run_layers(input_ids, position_ids, layers, self.capture_layers)
        return (self.target.lm_head(x).float(), features, *layers.presents)


class DraftGraph(nn.Module):
    def __init__(self, draft: DraftHead, embed_tokens: nn.Embedding, lm_head: nn.Linear, attention: str = "standard"):
        super().__init__()
        _check_kind(attention)
        self.draft = draft
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self.attention = attention

    def forward(self, hidden_states, context_position_ids, input_ids, position_ids, tree_mask, *past_key_values):
        draft = self.draft
        # DraftHead.write_context's K/V, appended to the past: the presents, and the block's context.
        context = chain.from_iterable(draft.context_key_values(hidden_states, context_position_ids))
        presents = [append_kv(past, new) for past, new in zip(past_key_values, context, strict=True)]
        # DraftHead.propose over the block after the whole context; the block's own K/V are dropped.
        layers = ContiguousKV(presents, self.attention, tree_mask, input_ids.shape[0])
        hidden = draft.run_layers(self.embed_tokens(input_ids), position_ids, layers)
        return (self.lm_head(hidden[1:]).float(), *presents)


@dataclass(frozen=True)
class GraphSpec:
    """Names and symbolic shapes of one graph's inputs and outputs (what the docs, the runner and the
    TensorRT optimisation profiles read)."""

    name: str
    inputs: dict[str, tuple]  # name -> dims (ints or axis names)
    outputs: dict[str, tuple]
    input_dtypes: dict[str, str]


def kv_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def target_spec(target: TargetModel, num_features: int, dtype: str) -> GraphSpec:
    cfg = target.config
    kv = (1, cfg.num_kv_heads, "past", cfg.head_dim)
    present = (1, cfg.num_kv_heads, "past+tokens", cfg.head_dim)
    inputs = {"input_ids": ("tokens",), "position_ids": ("tokens",), "tree_mask": ("tokens", "mask_words")}
    inputs |= {name: kv for name in kv_names("past", cfg.num_layers)}
    outputs = {"logits": ("tokens", cfg.vocab_size), "hidden_states": ("tokens", num_features * cfg.hidden_size)}
    outputs |= {name: present for name in kv_names("present", cfg.num_layers)}
    dtypes = {"input_ids": "int64", "position_ids": "int64", "tree_mask": "int32"}
    dtypes |= {name: dtype for name in kv_names("past", cfg.num_layers)}
    return GraphSpec("target", inputs, outputs, dtypes)


def draft_spec(draft: DraftHead, vocab_size: int, dtype: str) -> GraphSpec:
    cfg = draft.config
    kv = (1, cfg.num_kv_heads, "past", cfg.head_dim)
    present = (1, cfg.num_kv_heads, "past+context", cfg.head_dim)
    features = len(draft.spec.target_layer_ids) * draft.spec.target_hidden_size
    inputs = {"hidden_states": ("context", features), "context_position_ids": ("context",),
              "input_ids": ("block",), "position_ids": ("block",), "tree_mask": ("block", "mask_words")}
    inputs |= {name: kv for name in kv_names("past", cfg.num_layers)}
    outputs = {"logits": ("block-1", vocab_size)}
    outputs |= {name: present for name in kv_names("present", cfg.num_layers)}
    dtypes = {"hidden_states": dtype, "context_position_ids": "int64", "input_ids": "int64", "position_ids": "int64",
              "tree_mask": "int32"}
    dtypes |= {name: dtype for name in kv_names("past", cfg.num_layers)}
    return GraphSpec("draft", inputs, outputs, dtypes)
