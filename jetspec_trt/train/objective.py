"""The draft head's training forward and the distillation loss.

At inference the head drafts ONE block after the committed context (DraftHead.propose over the paged cache).
Training runs MANY blocks of a sequence in one pass, with the same math:

  * context: the target's fused features of all L tokens, projected once (hidden_norm(fc(.))); every head
    layer turns them into K/V with its own k_proj/v_proj (+k_norm, RoPE at positions 0..L-1), once per layer;
  * queries: the blocks [anchor, MASK x (B-1)] of K sampled anchors, embedded with the target's embedding, at
    positions a..a+B-1; each block also contributes its own K/V;
  * mask: a position i of the block anchored at a sees context keys < a (the committed tokens before the
    anchor, exactly what the inference cache holds) and its own block's positions <= i (causal);
  * output: head.norm(hidden) at block positions 1..B-1 through the target's lm_head = depth 1..B-1 logits.

Every projection, norm and MLP is the head's own submodule, so the trained weights are exactly what propose()
uses; tests compare the two paths' logits.

Loss (train/loss.py): at every block position, cross-entropy to the token at a+i or forward KL from the
target's next-token distribution at position a+i-1 over the real sequence, with depth-decayed weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.target import TargetModel


@dataclass
class BlockBatch:
    """N attention rows of K anchors each over U sequences' context features (padding anchors have valid False).

    Trainer.step_rows splits a sequence's anchors over several rows; the sequence's features are stored once
    and `row_sequence` names each row's sequence, so its context K/V are projected once, not once per row.
    """

    features: torch.Tensor  # [U, L, F] fused target features, zero past each sequence's end
    lengths: torch.Tensor  # [U] long, tokens per sequence
    anchors: torch.Tensor  # [N, K] long, absolute anchor positions (0 for padding)
    anchor_tokens: torch.Tensor  # [N, K] long, the token at each anchor
    anchor_valid: torch.Tensor  # [N, K] bool
    row_sequence: torch.Tensor | None = None  # [N] long, each row's sequence in `features` (None: row i is i)


def sample_anchors(prompt_len: int, length: int, count: int, generator: torch.Generator) -> list[int]:
    """Up to `count` distinct anchors in the response, where depth 1 has a teacher (a <= length-2).

    The first response token (position prompt_len) is the earliest anchor: at inference the first draft
    follows the prefill, with the prompt as context and the first generated token as anchor.
    """
    candidates = length - 1 - prompt_len
    if candidates <= 0:
        return []
    picks = torch.randperm(candidates, generator=generator)[:count] + prompt_len
    return sorted(picks.tolist())


def depth_valid(anchors: torch.Tensor, anchor_valid: torch.Tensor, lengths: torch.Tensor, block_size: int
                ) -> torch.Tensor:
    """[N, K, B-1] bool: depth i of an anchor a has a teacher iff a+i-1 <= length-2.

    The target's distribution at the last position predicts past the sequence's end (after EOS, or where
    generation was cut), which no draft has to match.
    """
    depths = torch.arange(1, block_size, device=anchors.device)
    teacher_pos = anchors[:, :, None] + depths - 1
    return anchor_valid[:, :, None] & (teacher_pos <= (lengths[:, None, None] - 2))


def block_mask(anchors: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """Dense boolean mask [N, 1, K*B, L + K*B] (True = may attend) for scaled_dot_product_attention."""
    n, k = anchors.shape
    device = anchors.device
    sees_context = torch.arange(context_len, device=device) < anchors[:, :, None]  # [N, K, L]
    sees_context = sees_context[:, :, None, :].expand(n, k, block_size, context_len).reshape(n, k * block_size,
                                                                                              context_len)
    index = torch.arange(k * block_size, device=device)
    same_block = (index // block_size)[:, None] == (index // block_size)[None, :]
    causal = (index % block_size)[:, None] >= (index % block_size)[None, :]
    own = (same_block & causal).expand(n, -1, -1)
    return torch.cat([sees_context, own], dim=-1)[:, None]


def block_tokens(batch: BlockBatch, block_size: int, mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, K, B] = [anchor, MASK x (B-1)] and their positions a..a+B-1."""
    n, k = batch.anchors.shape
    tokens = torch.full((n, k, block_size), mask_token_id, dtype=torch.long, device=batch.anchors.device)
    tokens[:, :, 0] = batch.anchor_tokens
    positions = batch.anchors[:, :, None] + torch.arange(block_size, device=batch.anchors.device)
    return tokens, positions


def block_hidden(head: DraftHead, target: TargetModel, batch: BlockBatch) -> torch.Tensor:
    """The head's normed hidden states [N, K, B, H] of every sampled block, in one pass."""
    spec = head.spec
    block_size = spec.block_size
    num_seqs, length, _ = batch.features.shape
    n, k = batch.anchors.shape
    rows = k * block_size
    dtype = head.fc.weight.dtype
    device = batch.features.device

    # Context K/V, layer by layer, through DraftHead.write_context's own path (the features projected once, then
    # each layer's k/v projections), once per sequence at positions 0..L-1; each row then takes its sequence's.
    context_kv = head.context_key_values(batch.features.to(dtype).reshape(num_seqs * length, -1),
                                         torch.arange(length, device=device).repeat(num_seqs))

    def per_row(t: torch.Tensor) -> torch.Tensor:  # [U*L, Hkv, D] -> [N, L, Hkv, D]
        t = t.view(num_seqs, length, *t.shape[1:])
        return t if batch.row_sequence is None else t.index_select(0, batch.row_sequence)

    tokens, positions = block_tokens(batch, block_size, spec.mask_token_id)
    x = target.embed(tokens.reshape(-1)).to(dtype)  # [N*K*B, H]
    cos_b, sin_b = head.rotary.cos_sin(positions.reshape(-1), x.dtype)
    mask = block_mask(batch.anchors, length, block_size)

    for layer, (k_ctx, v_ctx) in zip(head.layers, context_kv, strict=True):
        attn = layer.self_attn
        group = attn.num_heads // attn.num_kv_heads
        q, k_blk, v_blk = layer.attention_inputs(x, cos_b, sin_b)  # the serving layer's own body around attention
        keys = torch.cat([per_row(k_ctx), k_blk.view(n, rows, *k_blk.shape[1:])], dim=1)
        values = torch.cat([per_row(v_ctx), v_blk.view(n, rows, *v_blk.shape[1:])], dim=1)
        q = q.view(n, rows, *q.shape[1:]).transpose(1, 2)  # [N, Hq, K*B, D]
        # GQA by repeating K/V heads: the fused SDPA kernels that take an arbitrary mask want equal heads.
        keys = keys.transpose(1, 2).repeat_interleave(group, dim=1).to(q.dtype)
        values = values.transpose(1, 2).repeat_interleave(group, dim=1).to(q.dtype)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scale)
        x = layer.finish(x, o.transpose(1, 2).reshape(n * rows, attn.num_heads, attn.head_dim))
    return head.norm(x).view(n, k, block_size, -1)


def depth_logits(head: DraftHead, target: TargetModel, batch: BlockBatch) -> torch.Tensor:
    """Per-depth logits [N, K, B-1, V] in float32 (tests and evaluation; training gathers valid rows first)."""
    hidden = block_hidden(head, target, batch)[:, :, 1:]
    return target.lm_head(hidden.to(target.lm_head.weight.dtype)).float()

