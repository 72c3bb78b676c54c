"""The target decoder (Qwen3, and Qwen2/Llama with the same code) over the paged KV cache.

One forward serves prefill, an autoregressive step and a tree verify: the caller gives token ids, their RoPE
positions and the packed visibility mask of the new tokens (causal, [[1]] or tree ancestors). It returns the
logits of every new token and, concatenated, the hidden states after the requested layers (Hugging Face
`output_hidden_states` entry L+1 for layer L), which the draft head reads. `forward_hidden` is the same pass
without the lm_head, and `prefill` runs it causally over a whole sequence on a fresh cache with logits only where
the caller needs them (the lm_head is about 1 GFLOP per token at Qwen's vocabulary).

`run_layers` is that pass with the per-layer cache and attention left to a `LayerCall`: `paged_layer_call` for
the paged cache here; the ONNX graphs (export/onnx_graphs.py) give one over contiguous past/present K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from jetspec_trt.models.config import DecoderConfig
from jetspec_trt.models.layers import MLP, AttentionProjections, RMSNorm, Rotary
from jetspec_trt.plugins.layer_kernels import add_rms_norm, qk_norm_rope_write, rms_norm_op
from jetspec_trt.plugins.linear import linear
from jetspec_trt.plugins.tree_attention import (causal_mask, load_gpu_kernels, packed_causal_mask, signals_dependents,
                                                tree_attention)
from jetspec_trt.models.kv_cache import KVCacheSpec, PagedKVCache, write_kv


@dataclass
class TargetOutput:
    # [T, vocab] float32 (forward(float_logits=False): the model's dtype; prefill: [1, vocab] for logits="last",
    # None for "none")
    logits: torch.Tensor | None
    features: torch.Tensor | None  # [T, len(capture_layers) * hidden] or None
    hidden: torch.Tensor | None = None  # [T, hidden] final normed hidden state (set by prefill only)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer over the paged cache. Its inputs are plain tensors (no cache object, no
    layer index), so torch.compile traces it once and reuses the code for every layer."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = AttentionProjections(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias, cfg.qk_norm,
            cfg.rms_norm_eps,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        # The norms, q/k norm + RoPE + KV write and the post-attention residual add as the fused kernels of
        # plugins/layer_kernels.py (TargetModel.set_fused_layer_kernels): the same values in fewer launches.
        self.fused_kernels = False

    def forward(self, x, cos, sin, k_cache, v_cache, block_table, ctx_len, slots, tree_mask):
        """x [T, H]; the new tokens' K/V are written at flat `slots` of k_cache/v_cache [P, S, Hkv, D]."""
        attn = self.self_attn
        if self.fused_kernels:
            q, k, v = attn.projections(rms_norm_op(x, self.input_layernorm.weight, self.input_layernorm.eps))
            o = fused_paged_attention(attn, q, k, v, cos, sin, k_cache, v_cache, block_table, ctx_len, slots,
                                      tree_mask)
        else:
            q, k, v = self.attention_inputs(x, cos, sin)
            o = paged_attention(q, k, v, k_cache, v_cache, block_table, ctx_len, slots, tree_mask, attn.scale)
        return self.finish(x, o)

    # The attention seam: everything of the layer but the KV write and the attention itself, so a decoder with
    # its own cache layout (runtime.batch_decode's batched static cache, the ONNX graphs' contiguous past/present
    # K/V, training's batched blocks) runs the same layer body.
    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, H] -> q [T, Hq, D], k and v [T, Hkv, D] (input norm, projections, q/k norm, RoPE)."""
        return self.self_attn.query_key_value(self.input_layernorm(x), cos, sin)

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention output o [T, Hq, D]: o_proj residual, then the MLP residual."""
        norm = self.post_attention_layernorm
        if self.fused_kernels:
            x, h = add_rms_norm(x, self.self_attn.output(o.flatten(1)), norm.weight, norm.eps)
        else:
            x = x + self.self_attn.output(o.flatten(1))
            h = norm(x)
        return x + self.mlp(h)


@torch.compiler.disable
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, ctx_len: torch.Tensor, slots: torch.Tensor,
                    tree_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Write the new tokens' K/V at `slots`, then attend over the cache (the layer's only cache accesses).

    Kept out of torch.compile (a graph break between the compiled halves of a compiled layer): Inductor
    functionalizes the in-place KV write, and where its reinplacing pass gives up (it did for the fused-QKV
    layer that GPU engines run) it writes into a clone of the WHOLE per-layer cache and copies it back, every
    layer of every step: an AR step then cost O(allocated context), not O(context in use) (docs/engine.md,
    "Per-step cost and the allocated context"). Outside the graph the write is an in-place index_copy_ of T rows
    and no compiled graph takes a cache-sized input. Under CUDA graphs the break costs no device time."""
    write_kv(k_cache, v_cache, slots, k, v)
    return tree_attention(q, k_cache, v_cache, block_table, ctx_len, tree_mask, scale)


@torch.compiler.disable
def fused_paged_attention(attn: AttentionProjections, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_table: torch.Tensor, ctx_len: torch.Tensor, slots: torch.Tensor,
                          tree_mask: torch.Tensor) -> torch.Tensor:
    """paged_attention from the projections' raw q/k/v: q/k norm, RoPE and the KV write in one kernel
    (plugins.layer_kernels.qk_norm_rope_write), then the attention. Outside torch.compile for the same reason:
    the op writes the caches in place."""
    q_norm, k_norm = attn.q_norm, attn.k_norm
    q = qk_norm_rope_write(q, k, v, q_norm.weight if q_norm is not None else None,
                           k_norm.weight if k_norm is not None else None, cos, sin,
                           k_cache, v_cache, slots, q_norm.eps if q_norm is not None else 0.0)
    return tree_attention(q, k_cache, v_cache, block_table, ctx_len, tree_mask, attn.scale)


# How a pass runs layer i over its cache: (i, layer, x [T, H], cos, sin) -> the layer's output [T, H].
LayerCall = Callable[[int, DecoderLayer, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def paged_layer_call(cache: PagedKVCache, num_new: int, tree_mask: torch.Tensor) -> LayerCall:
    """DecoderLayer.forward over `cache`: the num_new tokens' K/V go to the slots after the committed context
    (not committed), and they see the context and each other as the packed `tree_mask` says."""
    slots = cache.slots(cache.ctx_len, num_new)

    def call(i, layer, x, cos, sin):
        return layer(x, cos, sin, cache.k[i], cache.v[i], cache.block_table, cache.ctx_len, slots, tree_mask)

    return call


class TargetModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(inv_freq, attention_scaling)
        self.decode_gemv = False
        self.gemv_pdl = 0  # the lm_head's GEMV launched as the final norm's programmatic dependent (set_decode_gemv)
        self.small_m_gemm = False

    def set_fused_layer_kernels(self, enabled: bool) -> None:
        """Run every layer's norms, q/k norm + RoPE + KV write and post-attention residual add, and the final norm,
        through the fused kernels (plugins.layer_kernels; RuntimeConfig.fused_layer_kernels). Compiled layers
        re-trace on the switch, as for set_decode_gemv."""
        set_fused_kernels(self.layers, enabled)
        self.norm.fused_kernel = enabled

    def set_decode_gemv(self, enabled: bool, gated: bool = False, pdl_prefetch: int = 0) -> None:
        """Route single-token GEMMs (the AR step: fused QKV, o_proj, gate-up, down, lm_head) through the
        weight-streaming GEMV op (plugins.gemv) instead of cuBLAS. Multi-token forwards (prefill, tree verify)
        keep cuBLAS either way. With it, `gated`: the MLP's activation inside the down projection's GEMV (one
        kernel less a layer); `pdl_prefetch` > 0: the GEMVs that follow our norm and attention kernels (QKV,
        o_proj, gate-up, lm_head) launched as their programmatic dependents, prefetching that many columns of W
        into L2 while those kernels run (plugins/gemv.py, PDL), on devices that have PDL (elsewhere 0). Compiled
        layers re-trace on the switch (the flags are read at trace time)."""
        self.decode_gemv = enabled
        self.gemv_pdl = pdl_prefetch if enabled and signals_dependents(self.embed_tokens.weight.device) else 0
        for layer in self.layers:
            layer.self_attn.decode_gemv = layer.mlp.decode_gemv = enabled
            layer.self_attn.gemv_pdl = layer.mlp.gemv_pdl = self.gemv_pdl
            layer.mlp.gated_gemv = enabled and gated

    def set_small_m_gemm(self, enabled: bool) -> None:
        """Route 2..64-row GEMMs (a tree verify's layers and lm_head, the draft's depth logits through
        `lm_head_rows`) through the weight-streaming skinny GEMM op (plugins.skinny_gemm) instead of cuBLAS. Single
        tokens keep the decode-GEMV switch, larger forwards cuBLAS. Compiled layers re-trace on the switch."""
        self.small_m_gemm = enabled
        for layer in self.layers:
            layer.self_attn.small_m_gemm = layer.mlp.small_m_gemm = enabled

    def fuse_weights(self) -> None:
        """QKV and gate-up GEMM fusion (GPU engines): fewer, larger GEMMs per layer. A model loaded from a fused
        engine already holds the fused tensors; this then only switches the forward to them."""
        fuse_layers(self.layers)

    def new_cache(self, max_tokens: int, page_size: int = 64, dtype: torch.dtype | None = None) -> PagedKVCache:
        cfg = self.config
        param = self.embed_tokens.weight
        spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_tokens, page_size, dtype or param.dtype)
        return PagedKVCache(spec, param.device)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        tree_mask: torch.Tensor,
        capture_layers: tuple[int, ...] = (),
        float_logits: bool = True,
    ) -> TargetOutput:
        """tokens/positions [T]; the new tokens' K/V land at slots ctx_len .. ctx_len+T-1 (not yet committed).
        float_logits=False leaves the logits in the model's dtype: greedy argmax picks the same token from them
        (the cast is exact), without writing and reading a float32 copy (a 64-node verify: 39 MB at Qwen's vocab)."""
        x, features = self.forward_hidden(tokens, positions, cache, tree_mask, capture_layers)
        return TargetOutput(self.logits(x) if float_logits else self.lm_head_rows(x), features)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., H]: rows of the table gathered by indexing. Not nn.Embedding: on CUDA its
        index_select runs a per-id loop kernel for <= 16 ids (the draft's block, a decode step), ~9 us for 16 ids on
        an H100 against ~2 us for the indexing kernel (kernel profile, engine-qwen2.5-0.5b-h100-draft-vocab.json)."""
        return self.embed_tokens.weight[tokens]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm_head over final normed hidden states [T, H] as `forward` runs it: float32 [T, vocab]."""
        return self.lm_head_rows(hidden).float()

    def lm_head_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm_head over hidden rows [T, H] in the model's dtype, through the GEMM the model's switches pick for
        T rows (the draft's depth logits come here: 15 rows of a 151936-row weight at Qwen's vocabulary)."""
        return linear(hidden, self.lm_head.weight, None, self.decode_gemv, use_small_m=self.small_m_gemm,
                      pdl_prefetch=self.gemv_pdl)

    def forward_hidden(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        tree_mask: torch.Tensor,
        capture_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` without the lm_head: the final normed hidden states [T, H] and the captured features."""
        return self.run_layers(tokens, positions, paged_layer_call(cache, tokens.shape[0], tree_mask), capture_layers)

    def run_layers(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        layer_call: LayerCall,
        capture_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward_hidden` with each layer run by `layer_call` (its cache and attention): embedding, RoPE at
        `positions`, the layers, the final norm; returns the normed hidden states [T, H] and the captured features."""
        x = self.embed(tokens)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        captured = {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer_call(i, layer, x, cos, sin)
            if i in capture_layers and i != last:
                captured[i] = x
        x = self.norm(x)
        if last in capture_layers:  # HF's last hidden-state entry is taken after the final norm
            captured[last] = x
        features = torch.cat([captured[i] for i in capture_layers], dim=-1) if capture_layers else None
        return x, features

    @torch.no_grad()
    def prefill(
        self,
        ids: torch.Tensor | list[int],
        cache: PagedKVCache | None = None,
        capture_layers: tuple[int, ...] = (),
        logits: Literal["all", "last", "none"] = "all",
        page_size: int = 64,
    ) -> TargetOutput:
        """One causal pass over the 1-D token sequence `ids` (positions 0 .. n-1), eager (compiled layers would
        specialise per length), without autograd.

        `cache`: None makes a fresh one of n tokens (`page_size`); a given cache is reset first. Either way it
        holds `ids` as committed context afterwards. `logits`: "all" gives [n, vocab] (the same as `forward`),
        "last" only the next-token logits [1, vocab], "none" skips the lm_head (logits=None). Always sets
        `hidden` (final normed hidden states [n, H]); `features` as in `forward`.
        """
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {logits!r}")
        device = self.embed_tokens.weight.device
        tokens = torch.as_tensor(ids, device=device)
        if tokens.dim() != 1 or tokens.shape[0] == 0:
            raise ValueError(f"prefill wants a non-empty 1-D id sequence, got shape {tuple(tokens.shape)}")
        n = tokens.shape[0]
        if cache is None:
            cache = self.new_cache(n, page_size)
        elif n > cache.capacity:
            raise ValueError(f"prefill of {n} tokens does not fit a cache of {cache.capacity}")
        cache.reset()
        with torch.compiler.set_stance("force_eager"):
            hidden, features = self.forward_hidden(tokens, torch.arange(n, device=device), cache,
                                                   causal_mask(n, device), tuple(capture_layers))
            out = None if logits == "none" else self.lm_head(hidden if logits == "all" else hidden[-1:]).float()
        cache.set_length(n)
        return TargetOutput(out, features, hidden)

    @torch.no_grad()
    def prefill_packed(self, sequences: list[list[int]], cache: PagedKVCache,
                       capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Independent causal passes over several sequences in ONE forward: the sequences are concatenated,
        each token sees only its own sequence's earlier tokens (block-diagonal causal mask) and RoPE positions
        restart at 0 per sequence. Returns the final normed hidden states [sum n, H] and captured features, equal
        to per-sequence `prefill` up to rounding. For short sequences at batch 1 each forward is launch-bound, so
        packing them is many times faster (training's feature pass). `cache` must hold all tokens; it is left
        reset (the packed K/V are no sequence's context)."""
        device = self.embed_tokens.weight.device
        lengths = torch.tensor([len(s) for s in sequences], device=device)
        total = int(lengths.sum())
        if not sequences or int(lengths.min()) == 0:
            raise ValueError("prefill_packed wants one or more non-empty sequences")
        if total > cache.capacity:
            raise ValueError(f"packed prefill of {total} tokens does not fit a cache of {cache.capacity}")
        if device.type == "cuda":
            # Every caller needs the Triton kernel here: the reference serves CUDA by attending the whole cache
            # densely in fp32, which made the training feature pass ~10x slower (346 s for 10.9 M tokens on an
            # H200, 2026-12-04) when no engine had loaded the kernel first. Idempotent and cheap after the first.
            load_gpu_kernels()
        tokens = torch.tensor([t for s in sequences for t in s], device=device)
        segment = torch.repeat_interleave(torch.arange(len(sequences), device=device), lengths)
        index = torch.arange(total, device=device)
        positions = index - (torch.cumsum(lengths, 0) - lengths)[segment]
        cache.reset()
        with torch.compiler.set_stance("force_eager"):
            hidden, features = self.forward_hidden(tokens, positions, cache, packed_causal_mask(lengths),
                                                   tuple(capture_layers))
        cache.reset()
        return hidden, features


def set_fused_kernels(layers: nn.ModuleList, enabled: bool) -> None:
    """The decoder layers' small ops on plugins.layer_kernels' fused kernels, or on torch's ops."""
    for layer in layers:
        layer.fused_kernels = enabled


def fuse_layers(layers: nn.ModuleList) -> None:
    for layer in layers:
        layer.self_attn.fuse()
        layer.mlp.fuse()


def compile_layers(layers: nn.ModuleList) -> None:
    """torch.compile each layer (one trace serves all: same code, parameters are inputs). At batch 1 the
    norms, RoPE and activations are dozens of tiny kernels per layer; Inductor fuses them."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(dynamic=False)
