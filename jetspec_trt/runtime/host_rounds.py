"""A decode round with the tree and the acceptance walk on the host: the backend of the eager reference `Decoder`
and of the onnxruntime `OnnxRunner`, which differ only in how they run the two models and keep their KV.

Each round: the draft's per-depth logits at the anchor, the best-first tree (`tree.tree.build_tree`), one
target pass over the tree with its packed ancestor mask, the acceptance walk (`tree.accept.accept`: greedy, or
sampling that keeps the target's distribution), and the commit of the accepted path. An AR step is the same
round over the anchor alone. A subclass runs the models:

    _prefill_logits(prompt_ids, capture)       the prompt through the target (caches reset): last row's logits
    _draft_logits(anchor, position, depth)     [depth, vocab]: the draft at the anchor, which sits at `position`
                                               (columns: draft_vocab_ids where the draft has its own vocabulary)
    _verify(tokens, positions, mask)           the target over the round's nodes (CPU tensors): logits [T, V]
    _commit(path, position)                    keep the KV (and features) of the accepted path's nodes
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.backend import DecodeRequest, RoundResult
from jetspec_trt.tree.accept import accept, next_token, token_logprobs
from jetspec_trt.tree.lookup import ContextIndex
from jetspec_trt.tree.tree import DraftTree, build_tree, with_chain


@dataclass(frozen=True)
class RoundInputs:
    """The nodes one round verifies: the tree's (or the anchor's alone), their RoPE positions and packed mask."""

    tree: DraftTree | None  # None: an AR step
    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor


class HostRounds:
    logprobs: list[float] | None = None  # with request.logprobs: of the tokens the last prefill / round returned
    # The token id of each column of _draft_logits (DraftHead.set_vocab); None: column j is token j.
    draft_vocab_ids: torch.Tensor | None = None

    def prepare(self, request: DecodeRequest) -> None:
        pass

    def prefill(self, request: DecodeRequest) -> int:
        self._request = request
        logits = self._prefill_logits(request.prompt_ids, request.speculative)
        seed = request.sampling.seed  # draws run where the logits are: the generator lives there too
        self._generator = torch.Generator(logits.device).manual_seed(seed) if seed is not None else None
        self._length = len(request.prompt_ids)  # committed tokens: the anchor's position
        self._anchor = next_token(logits, request.sampling, self._generator)
        # The committed text and the anchor, indexed for context-lookup chains (request.tree.lookup)
        lookup = request.speculative and request.tree.lookup
        self._context = ContextIndex(list(request.prompt_ids) + [self._anchor]) if lookup else None
        if request.logprobs:
            self.logprobs = token_logprobs(logits[None], [self._anchor], request.sampling)
        return self._anchor

    def decode_round(self) -> RoundResult:
        request = self._request
        depth_logits = (self._draft_logits(self._anchor, self._length, request.tree.draft_depth)
                        if request.speculative else None)
        inputs = self.round_inputs(depth_logits)
        return self.round_result(inputs, self._verify(inputs.tokens, inputs.positions, inputs.mask))

    # The round's two halves around the target pass, public so runtime/scheduler.py can run many sequences'
    # rounds with ONE draft pass and ONE target pass between them (decode_round above is the batch-1 case).

    def round_inputs(self, depth_logits: torch.Tensor | None) -> RoundInputs:
        """What the target verifies this round: the tree built from the draft's per-depth logits, or (None) the
        anchor alone for an AR step."""
        return self.tree_inputs(self.draft_tree(depth_logits) if depth_logits is not None else None)

    def draft_tree(self, depth_logits: torch.Tensor) -> DraftTree:
        """The request's best-first tree (of its own budget) from the draft's per-depth logits at the anchor; with
        tree.lookup, that many of the budget's nodes are kept for the context-lookup chain (as the CUDA graphs'
        fixed shapes keep them, used or not) and the draft gets the rest."""
        return with_chain(*self.draft_parts(depth_logits))

    def draft_parts(self, depth_logits: torch.Tensor) -> tuple[DraftTree, list[int]]:
        """draft_tree's two parts: the draft's best-first tree of budget - lookup nodes and the context-lookup
        chain ([] without lookup), for a scheduler that cuts them to a smaller budget (runtime/cost_model.py)."""
        tree = self._request.tree
        draft = build_tree(self._anchor, depth_logits, tree.budget - tree.lookup, tree.topk, tree.max_depth,
                           self.draft_vocab_ids)
        return draft, self._context.lookup(tree.lookup) if tree.lookup else []

    def tree_inputs(self, draft_tree: DraftTree | None) -> RoundInputs:
        """The round's inputs for `draft_tree` at the anchor (None: an AR step)."""
        anchor, position = self._anchor, self._length
        if draft_tree is None:
            return RoundInputs(None, torch.tensor([anchor]), torch.tensor([position]), causal_mask(1))
        return RoundInputs(draft_tree, draft_tree.tokens, position + draft_tree.depths, draft_tree.packed_mask())

    def round_result(self, inputs: RoundInputs, logits: torch.Tensor) -> RoundResult:
        """Accept from the target's logits [T, V] over `inputs`, commit the kept path, move the anchor."""
        sampling, position = self._request.sampling, self._length
        if inputs.tree is not None:
            result = accept(inputs.tree, logits, sampling, self._generator)
            path, emitted, drafted = result.path, result.emitted, inputs.tree.size - 1
        else:
            path, emitted, drafted = [0], [next_token(logits[0], sampling, self._generator)], 0
        if self._request.logprobs:  # emitted[j] was chosen at path node j, from that node's verified logits
            self.logprobs = token_logprobs(logits[path], emitted, sampling)
        self._commit(path, position)
        self._length += len(path)
        self._anchor = emitted[-1]
        if self._context is not None:
            self._context.extend(emitted)
        return RoundResult(emitted, drafted, len(path) - 1)

    def finish(self) -> None:
        pass

    # -- what a subclass runs ------------------------------------------------------------------------------------

    def _prefill_logits(self, prompt_ids: list[int], capture: bool) -> torch.Tensor:
        raise NotImplementedError

    def _draft_logits(self, anchor: int, position: int, max_depth: int) -> torch.Tensor:
        raise NotImplementedError

    def _verify(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _commit(self, path: list[int], position: int) -> None:
        raise NotImplementedError
