"""The TensorRT plugin `jetspec_trt::TreeAttention`: a Quickly Deployable Plugin (`tensorrt.plugin`, TensorRT
>= 10.6; IPluginV3 underneath) for the ONNX op of the same name (contract: jetspec_trt/plugins/onnx_op.py).

TensorRT's ONNX parser maps a node onto a registered plugin when the node's op type is the plugin's name and
its `plugin_namespace` attribute (or, from TensorRT 10.10, its domain) is the plugin's namespace; our `plugin`
graphs carry both. Call `register()` before parsing such a graph, and before deserialising an engine built
from one: the implementation is a Python callback (`@trtp.impl`), so the engine runs where this package,
PyTorch and CUDA are importable.

The callback wraps TensorRT's buffers as torch tensors (zero copy, on TensorRT's stream) and runs the op through
`onnx_op.contiguous_tree_attention`, i.e. the `jetspec_trt::tree_attention` torch op over a page-size-1 view
of the contiguous cache. On CUDA that op is served by the Triton kernel
(`jetspec_trt.plugins.triton_tree_attention`, loaded by name through `tree_attention.load_gpu_kernels`) when
Triton is importable, else by the reference (correct, slow).

Not provided: an ahead-of-time implementation (`@trtp.aot_impl`, engine without Python). It needs the kernel
compiled with TensorRT's argument order (inputs, scalar arguments, outputs) and without the split-K merge
pass; the Triton kernel is written for the torch op's launch instead.

No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as types.
"""

from typing import List, Tuple

from jetspec_trt.plugins.onnx_op import PLUGIN_ID

# One type per input and the output; "|" lists the alternatives (the i-th of each list go together).
TYPE_COMBINATIONS = "FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, INT32, INT32, FP32|FP16|BF16"

_registered = False


def register() -> None:
    """Register the plugin with TensorRT's plugin registry (idempotent). Needs `tensorrt.plugin`."""
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def tree_attention_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                            ctx_len: trtp.TensorDesc, tree_mask: trtp.TensorDesc, scale: float) -> trtp.TensorDesc:
        return query.like()  # [T, Hq, D] in the query's type

    @trtp.autotune(PLUGIN_ID)
    def tree_attention_autotune(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                                ctx_len: trtp.TensorDesc, tree_mask: trtp.TensorDesc,
                                outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(TYPE_COMBINATIONS, "LINEAR")]

    @trtp.impl(PLUGIN_ID)
    def tree_attention_impl(query: trtp.Tensor, key: trtp.Tensor, value: trtp.Tensor, ctx_len: trtp.Tensor,
                            tree_mask: trtp.Tensor, scale: float, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        run_on_stream(query, key, value, ctx_len, tree_mask, scale, outputs[0], stream)

    _registered = True


def run_on_stream(query, key, value, ctx_len, tree_mask, scale: float, out, stream: int) -> None:
    """The plugin's work: TensorRT buffers (anything with __cuda_array_interface__) -> the op -> `out`."""
    import torch

    from jetspec_trt.plugins.onnx_op import contiguous_tree_attention
    from jetspec_trt.plugins.tree_attention import load_gpu_kernels

    load_gpu_kernels()  # the Triton kernel for CUDA, once; without Triton the reference serves
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        q, k, v = (torch.as_tensor(t, device="cuda") for t in (query, key, value))
        ctx = torch.as_tensor(ctx_len, device="cuda")
        mask = torch.as_tensor(tree_mask, device="cuda")
        result = torch.as_tensor(out, device="cuda")
        result.copy_(contiguous_tree_attention(q, k, v, ctx, mask, float(scale)))
