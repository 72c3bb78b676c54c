"""The tree-attention custom op of the exported ONNX graphs (`--attention plugin`): domain ``jetspec_trt``,
op type ``TreeAttention``, version 1. The same op is the TensorRT plugin ``jetspec_trt::TreeAttention``
(`jetspec_trt/plugins/tensorrt_plugin.py`), so TensorRT's ONNX parser maps the node onto the plugin.

    out = TreeAttention(query, key, value, ctx_len, tree_mask; scale)

    inputs
      query      float [T, Hq, D]        queries of the T new tokens, RoPE (and Qwen3's q-norm) applied
      key        float [1, Hkv, S, D]    the layer's keys, contiguous: S >= ctx_len + T; the committed context at
                                         slots 0..ctx_len-1, the new tokens at ctx_len..ctx_len+T-1 (RoPE applied);
                                         slots after ctx_len+T are ignored. Hq % Hkv == 0 (GQA).
      value      float [1, Hkv, S, D]    the layer's values, same layout
      ctx_len    int32 [1]               committed tokens (every query sees them all)
      tree_mask  int32 [T, ceil(T/32)]   packed visibility among the new tokens: bit (j % 32) of word j // 32 of
                                         row i (LSB first) is set when query i sees new token j (its ancestors and
                                         itself); the layout of TensorRT-LLM's spec_decoding_packed_mask. Causal
                                         for prefill and the draft block, [[1]] for one decode step.
    attributes
      scale             float    softmax scale (head_dim ** -0.5 for Qwen)
      plugin_namespace  string   "jetspec_trt" (read by TensorRT's ONNX parser; carries no semantics)
      plugin_version    string   "1"
    output
      out        float [T, Hq, D]        softmax(scale * q k^T + mask) v over the visible keys, accumulated in
                                         float32, in query's dtype

It is the paged op `jetspec_trt::tree_attention` (tree_attention.py) on a single-sequence contiguous cache: the
same numbers, with the page table the identity. In the exported graphs `key`/`value` are the layer's present
K/V (past + new, so S = ctx_len + T) and ctx_len is the past length. `contiguous_tree_attention` below runs the
op on PyTorch tensors (the paged op on a page-size-1 view of the contiguous cache, so on CUDA the Triton
kernel serves any S without recompiling); `reference_function()` gives the op as an ONNX function of standard
ops, which onnxruntime can run in place of the plugin (the tests do).
"""

from __future__ import annotations

import torch

DOMAIN = "jetspec_trt"
OP_TYPE = "TreeAttention"
VERSION = 1
PLUGIN_ID = f"{DOMAIN}::{OP_TYPE}"  # TensorRT plugin name = the ONNX op type, namespace = the domain

# A torch op whose export is the ONNX node above (the exporter maps it through `onnx_translation`).
TORCH_OP = "jetspec_trt::onnx_tree_attention"


def contiguous_tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx_len: torch.Tensor,
                              tree_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The op on torch tensors (any device): the paged op over a page-size-1 view of the contiguous cache."""
    from jetspec_trt.plugins.tree_attention import tree_attention

    slots = key.shape[2]
    k_cache = key[0].transpose(0, 1).unsqueeze(1)  # [S, 1, Hkv, D]: page p = slot p
    v_cache = value[0].transpose(0, 1).unsqueeze(1)
    block_table = torch.arange(slots, dtype=torch.int32, device=key.device)
    return tree_attention(query, k_cache, v_cache, block_table, ctx_len.to(torch.int32).reshape(1),
                          tree_mask.to(torch.int32), scale)


@torch.library.custom_op(TORCH_OP, mutates_args=())
def onnx_tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx_len: torch.Tensor,
                        tree_mask: torch.Tensor, scale: float) -> torch.Tensor:
    return contiguous_tree_attention(query, key, value, ctx_len, tree_mask, scale)


@onnx_tree_attention.register_fake
def _onnx_tree_attention_fake(query, key, value, ctx_len, tree_mask, scale):
    return torch.empty_like(query)


def register_schema() -> None:
    """Register the op's ONNX schema with the `onnx` package (idempotent): onnx.checker then checks the node's
    inputs, types and attributes, and onnxscript can emit it."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    param = OpSchema.FormalParameter
    schema = OpSchema(
        OP_TYPE, DOMAIN, VERSION,
        doc="Tree attention over a contiguous single-sequence KV cache (jetspec_trt/plugins/onnx_op.py).",
        inputs=[param("query", "T", "[T, Hq, D], RoPE applied"),
                param("key", "T", "[1, Hkv, S, D], context then the new tokens"),
                param("value", "T", "[1, Hkv, S, D]"),
                param("ctx_len", "tensor(int32)", "[1], committed tokens"),
                param("tree_mask", "tensor(int32)", "[T, ceil(T/32)], packed visibility among new tokens")],
        outputs=[param("out", "T", "[T, Hq, D]")],
        type_constraints=[("T", float_types, "activation type")],
        attributes=[OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale", required=True),
                    OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace",
                                       required=False),
                    OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version",
                                       required=False)],
    )
    onnx.defs.register_schema(schema)


def onnx_translation():
    """{torch op overload: onnxscript function} for torch.onnx.export(custom_translation_table=...)."""
    import onnxscript

    register_schema()
    tree_attention = getattr(onnxscript.values.Opset(DOMAIN, VERSION), OP_TYPE)

    def tree_attention_node(query, key, value, ctx_len, tree_mask, scale: float):
        return tree_attention(query, key, value, ctx_len, tree_mask, scale=scale,
                              plugin_namespace=DOMAIN, plugin_version=str(VERSION))

    return {torch.ops.jetspec_trt.onnx_tree_attention.default: tree_attention_node}


def reference_function(opset: int = 18):
    """The op as an ONNX FunctionProto of standard ops (domain jetspec_trt, TreeAttention, attribute `scale`).

    Appending it to a plugin graph's `functions` lets onnxruntime run that graph (it inlines model-local
    functions). Do not ship it inside graphs meant for TensorRT: its parser would inline it instead of using
    the plugin.
    """
    import onnx
    from onnx import TensorProto, helper

    def const(name, value, dtype=TensorProto.INT64):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(value)], value))

    nodes = [
        # Shapes: T new tokens, S key slots, group = Hq / Hkv.
        helper.make_node("Shape", ["query"], ["q_shape"]),
        helper.make_node("Shape", ["key"], ["k_shape"]),
        const("i0", [0]), const("i1", [1]), const("i2", [2]), const("i3", [3]),
        helper.make_node("Gather", ["q_shape", "i0"], ["T"]),
        helper.make_node("Gather", ["q_shape", "i1"], ["Hq"]),
        helper.make_node("Gather", ["k_shape", "i1"], ["Hkv"]),
        helper.make_node("Gather", ["k_shape", "i2"], ["S"]),
        helper.make_node("Gather", ["k_shape", "i3"], ["D"]),
        helper.make_node("Div", ["Hq", "Hkv"], ["group"]),
        # K/V [1,Hkv,S,D] -> [Hkv,group,S,D] -> [Hq,S,D] (query head h reads KV head h // group).
        helper.make_node("Concat", ["Hkv", "group", "S", "D"], ["expand_shape"], axis=0),
        helper.make_node("Concat", ["Hq", "S", "D"], ["heads_shape"], axis=0),
        helper.make_node("Transpose", ["key"], ["k_t"], perm=[1, 0, 2, 3]),
        helper.make_node("Expand", ["k_t", "expand_shape"], ["k_e"]),
        helper.make_node("Reshape", ["k_e", "heads_shape"], ["k_h"]),
        helper.make_node("Transpose", ["value"], ["v_t"], perm=[1, 0, 2, 3]),
        helper.make_node("Expand", ["v_t", "expand_shape"], ["v_e"]),
        helper.make_node("Reshape", ["v_e", "heads_shape"], ["v_h"]),
        helper.make_node("Cast", ["k_h"], ["k32"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["v_h"], ["v32"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["query"], ["q32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["q32"], ["q_h"], perm=[1, 0, 2]),  # [Hq,T,D]
        helper.make_node("Transpose", ["k32"], ["k_ht"], perm=[0, 2, 1]),  # [Hq,D,S]
        helper.make_node("MatMul", ["q_h", "k_ht"], ["qk"]),
        helper.make_node("Constant", [], ["scale_value"], value_float=0.0),
        helper.make_node("Mul", ["qk", "scale_value"], ["scores"]),
        # Visibility [T,S]: slot s < ctx_len, or s - ctx_len = j in 0..T-1 with bit j of row i set.
        helper.make_node("Cast", ["ctx_len"], ["ctx64"], to=TensorProto.INT64),
        const("zero", [0]), const("one", [1]), const("two", [2]), const("bits32", [32]),
        const("two32", [2**32]),
        helper.make_node("Squeeze", ["S"], ["S0"]),
        helper.make_node("Range", ["zero_s", "S0", "one_s"], ["slots"]),
        helper.make_node("Sub", ["slots", "ctx64"], ["new_index"]),  # [S]
        helper.make_node("Less", ["slots", "ctx64"], ["committed"]),
        helper.make_node("Max", ["new_index", "zero"], ["j_low"]),
        helper.make_node("Sub", ["T", "one"], ["T_last"]),
        helper.make_node("Min", ["j_low", "T_last"], ["j"]),  # clamped new-token index of each slot
        helper.make_node("GreaterOrEqual", ["new_index", "zero"], ["after_ctx"]),
        helper.make_node("Less", ["new_index", "T"], ["before_end"]),
        helper.make_node("And", ["after_ctx", "before_end"], ["in_tree"]),
        helper.make_node("Div", ["j", "bits32"], ["word_index"]),
        helper.make_node("Mod", ["j", "bits32"], ["bit_index"]),
        helper.make_node("Cast", ["tree_mask"], ["mask64"], to=TensorProto.INT64),
        helper.make_node("Less", ["mask64", "zero"], ["negative"]),
        helper.make_node("Add", ["mask64", "two32"], ["wrapped"]),
        helper.make_node("Where", ["negative", "wrapped", "mask64"], ["unsigned"]),  # words as 0..2^32-1
        helper.make_node("Gather", ["unsigned", "word_index"], ["words"], axis=1),  # [T,S]
        const("pow2", [2**b for b in range(32)]),
        helper.make_node("Gather", ["pow2", "bit_index"], ["bit_value"]),
        helper.make_node("Div", ["words", "bit_value"], ["shifted"]),
        helper.make_node("Mod", ["shifted", "two"], ["bit"]),
        helper.make_node("Equal", ["bit", "one"], ["bit_set"]),
        helper.make_node("And", ["bit_set", "in_tree"], ["tree_visible"]),
        helper.make_node("Or", ["tree_visible", "committed"], ["visible"]),
        helper.make_node("Constant", [], ["neg_inf"], value_float=float("-inf")),
        helper.make_node("Where", ["visible", "scores", "neg_inf"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v32"], ["o_h"]),  # [Hq,T,D]
        helper.make_node("Transpose", ["o_h"], ["o32"], perm=[1, 0, 2]),
        helper.make_node("CastLike", ["o32", "query"], ["out"]),
    ]
    # `scale` is the function's attribute: the Constant above takes it by reference.
    scale_node = next(n for n in nodes if n.output == ["scale_value"])
    del scale_node.attribute[:]
    ref = onnx.AttributeProto(name="value_float", ref_attr_name="scale", type=onnx.AttributeProto.FLOAT)
    scale_node.attribute.append(ref)
    nodes.insert(0, helper.make_node("Constant", [], ["zero_s"], value_int=0))
    nodes.insert(1, helper.make_node("Constant", [], ["one_s"], value_int=1))
    return helper.make_function(
        DOMAIN, OP_TYPE, ["query", "key", "value", "ctx_len", "tree_mask"], ["out"], nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["scale", "plugin_namespace", "plugin_version"],
    )


def with_reference_function(model, opset: int | None = None):
    """A copy of an ONNX plugin graph that onnxruntime can run: the op's reference function appended."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    default = next((o.version for o in copy.opset_import if o.domain in ("", "ai.onnx")), 18)
    copy.functions.append(reference_function(opset or default))
    return copy
