"""The eager reference decoder: JetSpec rounds (draft -> tree -> verify -> accept -> compact) and the plain AR
path, on the CPU or CUDA, greedy or sampling. The round loop is `runtime.round_loop.run_rounds`; this class is
its backend through `runtime.host_rounds.HostRounds` (tree and acceptance on the host), running the PyTorch
modules over paged caches.

Invariant between rounds: the target cache holds the n committed tokens before the anchor; the draft cache
holds the projected features of the same n tokens once `pending` features are appended; the anchor (the last
emitted token) is in neither and becomes the tree's root at position n.
"""

from __future__ import annotations

from typing import Iterator

import torch

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.kv_cache import PagedKVCache
from jetspec_trt.models.target import TargetModel
from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.host_rounds import HostRounds
from jetspec_trt.runtime.round_loop import DecodeStats, run_rounds
from jetspec_trt.tree.accept import SamplingConfig


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the token lists differ (a strict prefix differs at its end); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class Decoder(HostRounds):
    def __init__(self, target: TargetModel, draft: DraftHead | None, runtime: RuntimeConfig,
                 caches: tuple[PagedKVCache, PagedKVCache | None] | None = None):
        """`caches` (target, draft): caches to decode in instead of new ones of runtime.cache_tokens() each (the
        scheduler's sequences take theirs from its page pools)."""
        self.target = target
        self.draft = draft
        self.runtime = runtime
        self.device = target.embed_tokens.weight.device
        self.capture_layers = tuple(runtime.target_layer_ids)
        if caches is None:
            caches = (target.new_cache(runtime.cache_tokens(), runtime.page_size),
                      draft.new_cache(runtime.cache_tokens(), runtime.page_size) if draft is not None else None)
        self.target_cache, self.draft_cache = caches
        self._block_mask = causal_mask(runtime.block_size, self.device)
        self.stats: DecodeStats | None = None

    @property
    def vocab_size(self) -> int:
        return self.target.config.vocab_size

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        speculative: bool = True,
        tree: TreeConfig | None = None,
        logprobs: bool = False,
    ) -> Iterator[list[int]]:
        """Yield the new tokens of each round. `self.stats` describes the call once the iterator ends (with
        `logprobs`, stats.token_logprobs too)."""
        if speculative and self.draft is None:
            raise JetSpecError("speculative decoding needs a draft head")
        yield from run_rounds(self, prompt_ids, max_new_tokens, sampling, speculative, tree, logprobs)

    # -- the models, for HostRounds ------------------------------------------------------------------------------

    def _prefill_logits(self, prompt_ids: list[int], capture: bool) -> torch.Tensor:
        n = len(prompt_ids)
        self._capture = self.capture_layers if capture else ()
        cache = self.target_cache
        cache.reset()
        positions = torch.arange(n, device=self.device)
        out = self.target(torch.tensor(prompt_ids, device=self.device), positions, cache,
                          causal_mask(n, self.device), self._capture)
        cache.commit(positions)
        if capture:
            self.draft_cache.reset()
            self._pending = (out.features, positions)
        return out.logits[-1]

    def _draft_logits(self, anchor: int, position: int, max_depth: int) -> torch.Tensor:
        self.draft.extend_context(*self._pending, self.draft_cache)
        return self.draft_depth_logits(anchor, position, max_depth)

    def _verify(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = self.device
        out = self.target(tokens.to(device), positions.to(device), self.target_cache, mask.to(device), self._capture)
        self._features = out.features
        return out.logits

    def _commit(self, path: list[int], position: int) -> None:
        kept = torch.tensor(path, device=self.device)
        self.target_cache.commit(kept)
        if self._capture:
            self._pending = (self._features[kept], position + torch.arange(len(path), device=self.device))

    def draft_depth_logits(self, anchor: int, position: int, max_depth: int) -> torch.Tensor:
        """One draft pass over [anchor, MASK x (block_size-1)] at `position`: logits [max_depth, the draft's
        vocabulary] (draft_vocab_ids)."""
        block_size = self.runtime.block_size
        block = torch.full((block_size,), self.runtime.mask_token_id, device=self.device)
        block[0] = anchor
        embeds = self.target.embed(block)
        positions = position + torch.arange(block_size, device=self.device)
        hidden = self.draft.propose(embeds, positions, self.draft_cache, self._block_mask)
        return self.draft.depth_logits(hidden[1 : 1 + max_depth], self.target)

    @property
    def draft_vocab_ids(self) -> torch.Tensor | None:
        return self.draft.vocab_ids if self.draft is not None else None
