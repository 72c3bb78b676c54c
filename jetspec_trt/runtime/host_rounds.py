"""A decode round with the tree and the acceptance walk on the host: the backend of the eager reference `Decoder`
and of the onnxruntime `OnnxRunner`, which differ only in how they run the two models and keep their KV.

Each round: the draft's per-depth logits at the anchor, the best-first tree (`tree.tree.build_tree`), one
target pass over the tree with its packed ancestor mask, the acceptance walk (`tree.accept.accept`: greedy, or
sampling that keeps the target's distribution), and the commit of the accepted path. An AR step is the same
round over the anchor alone. A subclass runs the models:

    _prefill_logits(prompt_ids, capture)       the prompt through the target (caches reset): last row's logits
    _draft_logits(anchor, position, depth)     [depth, vocab]: the draft at the anchor, which sits at `position`
    _verify(tokens, positions, mask)           the target over the round's nodes (CPU tensors): logits [T, V]
    _commit(path, position)                    keep the KV (and features) of the accepted path's nodes
"""

from __future__ import annotations

import torch

from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.backend import DecodeRequest, RoundResult
from jetspec_trt.tree.accept import accept, next_token, token_logprobs
from jetspec_trt.tree.tree import build_tree


class HostRounds:
    logprobs: list[float] | None = None  # with request.logprobs: of the tokens the last prefill / round returned

    def prepare(self, request: DecodeRequest) -> None:
        pass

    def prefill(self, request: DecodeRequest) -> int:
        self._request = request
        logits = self._prefill_logits(request.prompt_ids, request.speculative)
        seed = request.sampling.seed  # draws run where the logits are: the generator lives there too
        self._generator = torch.Generator(logits.device).manual_seed(seed) if seed is not None else None
        self._length = len(request.prompt_ids)  # committed tokens: the anchor's position
        self._anchor = next_token(logits, request.sampling, self._generator)
        if request.logprobs:
            self.logprobs = token_logprobs(logits[None], [self._anchor], request.sampling)
        return self._anchor

    def decode_round(self) -> RoundResult:
        request, anchor, position = self._request, self._anchor, self._length
        sampling, tree = request.sampling, request.tree
        if request.speculative:
            draft_tree = build_tree(anchor, self._draft_logits(anchor, position, tree.max_depth), tree.budget,
                                    tree.topk, tree.max_depth)
            logits = self._verify(draft_tree.tokens, position + draft_tree.depths, draft_tree.packed_mask())
            result = accept(draft_tree, logits, sampling, self._generator)
            path, emitted, drafted = result.path, result.emitted, draft_tree.size - 1
        else:
            logits = self._verify(torch.tensor([anchor]), torch.tensor([position]), causal_mask(1))
            path, emitted, drafted = [0], [next_token(logits[0], sampling, self._generator)], 0
        if request.logprobs:  # emitted[j] was chosen at path node j, from that node's verified logits
            self.logprobs = token_logprobs(logits[path], emitted, sampling)
        self._commit(path, position)
        self._length += len(path)
        self._anchor = emitted[-1]
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
