"""Export-friendly wrappers of the target and the draft head: contiguous KV in, present KV out.

The serving models keep K/V in a paged cache that they write in place; ONNX graphs (and the TensorRT engines
built from them) instead take each layer's past K/V as inputs `past_key_{i}` / `past_value_{i}`
[1, Hkv, past, D] and return `present_key_{i}` / `present_value_{i}` [1, Hkv, past + new, D]; the caller keeps
the rows it commits. The wrappers own no weights: they call the real modules (embedding, RMSNorm,
AttentionProjections.query_key_value / key_value, RoPE, MLP, LM head) and only replace the cache write and the
attention op:

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

import torch
from torch import nn

from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.target import TargetModel

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


def layer_forward(layer, x, cos, sin, past_key, past_value, attend: Attend):
    """DecoderLayer.forward with contiguous KV: the same submodules, the cache write replaced by a concat."""
    attn = layer.self_attn
    q, k, v = attn.query_key_value(layer.input_layernorm(x), cos, sin)
    key, value = append_kv(past_key, k), append_kv(past_value, v)
    x = x + attn.o_proj(attend(q, key, value, attn.scale).flatten(1))
    return x + layer.mlp(layer.post_attention_layernorm(x)), key, value


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
        target = self.target
        x = target.embed_tokens(input_ids)
        cos, sin = target.rotary.cos_sin(position_ids, x.dtype)
        attend = Attend(self.attention, tree_mask, input_ids.shape[0], past_key_values[0])
        presents, captured = [], {}
        last = len(target.layers) - 1
        for i, layer in enumerate(target.layers):
            x, key, value = layer_forward(layer, x, cos, sin, past_key_values[2 * i], past_key_values[2 * i + 1],
                                          attend)
            presents += [key, value]
            if i in self.capture_layers and i != last:
                captured[i] = x
        x = target.norm(x)
        if last in self.capture_layers:  # as TargetModel.forward: the last entry is taken after the final norm
            captured[last] = x
        features = torch.cat([captured[i] for i in self.capture_layers], dim=-1)
        return (target.lm_head(x).float(), features, *presents)


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
        # DraftHead.write_context: project the new context tokens' features into every layer's K/V.
        context = draft.project_context(hidden_states)
        cos, sin = draft.rotary.cos_sin(context_position_ids, context.dtype)
        presents = []
        for i, layer in enumerate(draft.layers):
            k, v = layer.self_attn.key_value(context, cos, sin)
            presents += [append_kv(past_key_values[2 * i], k), append_kv(past_key_values[2 * i + 1], v)]
        # DraftHead.propose over the block, after the whole context.
        x = self.embed_tokens(input_ids)
        cos, sin = draft.rotary.cos_sin(position_ids, x.dtype)
        attend = Attend(self.attention, tree_mask, input_ids.shape[0], presents[0])
        for i, layer in enumerate(draft.layers):
            x, _, _ = layer_forward(layer, x, cos, sin, presents[2 * i], presents[2 * i + 1], attend)
        hidden = draft.norm(x)
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
