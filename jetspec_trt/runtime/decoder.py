"""Token-level decoding: JetSpec rounds (draft -> tree -> verify -> accept -> compact) and the plain AR path.

Invariant between rounds: the target cache holds the n committed tokens before the anchor; the draft cache
holds the projected features of the same n tokens once `pending` features are appended; the anchor (the last
emitted token) is in neither and becomes the tree's root at position n.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.target import TargetModel
from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.round_loop import DecodeStats, TokenLimit, check_prompt
from jetspec_trt.tree.accept import SamplingConfig, accept, next_token
from jetspec_trt.tree.tree import build_tree


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the token lists differ (a strict prefix differs at its end); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class Decoder:
    def __init__(self, target: TargetModel, draft: DraftHead | None, runtime: RuntimeConfig):
        self.target = target
        self.draft = draft
        self.runtime = runtime
        self.device = target.embed_tokens.weight.device
        self.capture_layers = tuple(runtime.target_layer_ids)
        self.target_cache = target.new_cache(runtime.cache_tokens(), runtime.page_size)
        self.draft_cache = draft.new_cache(runtime.cache_tokens(), runtime.page_size) if draft is not None else None
        self._block_mask = causal_mask(runtime.block_size, self.device)
        self._one = causal_mask(1, self.device)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        speculative: bool = True,
        tree: TreeConfig | None = None,
    ) -> Iterator[list[int]]:
        """Yield the new tokens of each round. `self.stats` describes the call once the iterator ends."""
        max_new_tokens = check_prompt(prompt_ids, max_new_tokens, self.target.config.vocab_size,
                                      self.runtime.max_seq_len)
        tree = tree or self.runtime.tree
        if speculative and self.draft is None:
            raise JetSpecError("speculative decoding needs a draft head")
        self.stats = stats = DecodeStats(prompt_tokens=len(prompt_ids))
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        limit = TokenLimit(max_new_tokens, self.runtime.eos_token_ids, stats)

        start = time.perf_counter()
        prompt = torch.tensor(prompt_ids, device=self.device)
        n = len(prompt_ids)
        cache = self.target_cache
        cache.reset()
        capture = self.capture_layers if speculative else ()
        out = self.target(prompt, torch.arange(n, device=self.device), cache, causal_mask(n, self.device), capture)
        cache.commit(torch.arange(n, device=self.device))
        anchor = next_token(out.logits[-1], sampling, generator)
        stats.prefill_s = time.perf_counter() - start
        tokens, done = limit.take([anchor])
        yield tokens
        start = time.perf_counter()
        if speculative:
            self.draft_cache.reset()
            pending = (out.features, torch.arange(n, device=self.device))
        while not done:
            position = cache.length
            if speculative and tree.budget > 1:
                self.draft.extend_context(*pending, self.draft_cache)
                draft_tree = self._draft_tree(anchor, position, tree)
                tree_tokens, positions = draft_tree.tokens.to(self.device), position + draft_tree.depths.to(self.device)
                mask = draft_tree.packed_mask().to(self.device)
            else:
                draft_tree = None
                tree_tokens = torch.tensor([anchor], device=self.device)
                positions, mask = torch.tensor([position], device=self.device), self._one
            out = self.target(tree_tokens, positions, cache, mask, capture)
            if draft_tree is not None:
                result = accept(draft_tree, out.logits, sampling, generator)
                path, emitted = result.path, result.emitted
                stats.drafted_tokens += draft_tree.size - 1
                stats.accepted_drafts += len(path) - 1
            else:
                path, emitted = [0], [next_token(out.logits[0], sampling, generator)]
            kept = torch.tensor(path, device=self.device)
            cache.commit(kept)
            if speculative:
                pending = (out.features[kept], position + torch.arange(len(path), device=self.device))
            stats.rounds += 1
            stats.emitted_per_round.append(len(emitted))
            anchor = emitted[-1]
            tokens, done = limit.take(emitted)
            yield tokens
        stats.decode_s = time.perf_counter() - start

    def _draft_tree(self, anchor: int, position: int, tree: TreeConfig):
        depth_logits = self.draft_depth_logits(anchor, position, tree.max_depth)
        return build_tree(anchor, depth_logits, tree.budget, tree.topk, tree.max_depth)

    def draft_depth_logits(self, anchor: int, position: int, max_depth: int) -> torch.Tensor:
        """One draft pass over [anchor, MASK x (block_size-1)] at `position`: logits [max_depth, vocab]."""
        block_size = self.runtime.block_size
        block = torch.full((block_size,), self.runtime.mask_token_id, device=self.device)
        block[0] = anchor
        embeds = self.target.embed_tokens(block)
        positions = position + torch.arange(block_size, device=self.device)
        hidden = self.draft.propose(embeds, positions, self.draft_cache, self._block_mask)
        return self.target.lm_head(hidden[1 : 1 + max_depth])
