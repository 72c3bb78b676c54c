"""JetSpec decoding driven by onnxruntime sessions of an ONNX export (`jetspec-trt export onnx`).

A backend of the one round loop (`runtime.round_loop.run_rounds`) through `runtime.host_rounds.HostRounds`, as
the reference decoder is, with the two graphs in place of the modules and contiguous KV in place of the paged
cache: prefill through the target graph; then each round one draft-graph call (append the last round's committed
features to the head's context, draft the block), the best-first tree (`tree.tree.build_tree`), one target-graph
call over the tree with its packed ancestor mask, the acceptance walk (`tree.accept.accept`), and the commit,
which keeps the committed KV rows and the accepted path's rows of the target's present KV. Greedy output is the
target's own greedy decoding, token for token.

    runner = OnnxRunner("onnx_dir")
    tokens = runner.generate_ids(prompt_ids, max_new_tokens=64)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from jetspec_trt.errors import JetSpecError
from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.host_rounds import HostRounds
from jetspec_trt.runtime.round_loop import DecodeStats, run_rounds
from jetspec_trt.tree.accept import SamplingConfig

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class OnnxRunner(HostRounds):
    def __init__(self, onnx_dir: Path | str, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 threads: int = 0, reference_plugin: bool = False):
        """`reference_plugin`: run `plugin` graphs with the TreeAttention op's ONNX reference function in place of
        the TensorRT plugin (onnxruntime has no kernel for the custom op)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise JetSpecError("onnxruntime is not installed: pip install 'jetspec-trt[onnx]'") from None
        from jetspec_trt.export.onnx import read_onnx_config

        self.dir = Path(onnx_dir)
        self.config = read_onnx_config(self.dir)
        self.runtime = RuntimeConfig.load(self.dir)
        if self.config["dtype"] not in NUMPY_DTYPES:
            raise JetSpecError(f"the ONNX runner takes float32 or float16 graphs, not {self.config['dtype']}")
        if self.config["attention"] == "plugin" and not reference_plugin:
            raise JetSpecError("plugin graphs hold the jetspec_trt.TreeAttention op, which onnxruntime cannot run; "
                               "export with --attention standard (or pass reference_plugin=True)")
        self.dtype = NUMPY_DTYPES[self.config["dtype"]]
        options = ort.SessionOptions()
        # Idle worker threads would otherwise spin between the many small calls of a decode, starving anything
        # else on the machine (the draft/tree/accept steps in between, a PyTorch engine beside it).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.target, self.draft = (ort.InferenceSession(self._model_bytes(graph), options, providers=list(providers))
                                   for graph in ("target", "draft"))
        self.target_shape, self.draft_shape = self.config["target"], self.config["draft"]
        self.target_kv_names = [n for n in self.config["graphs"]["target"]["inputs"] if n.startswith("past_")]
        self.draft_kv_names = [n for n in self.config["graphs"]["draft"]["inputs"] if n.startswith("past_")]
        self.target_outputs = list(self.config["graphs"]["target"]["outputs"])
        self.draft_outputs = list(self.config["graphs"]["draft"]["outputs"])
        self.stats: DecodeStats | None = None

    @property
    def vocab_size(self) -> int:
        return self.target_shape["vocab_size"]

    def _model_bytes(self, graph: str):
        path = self.dir / self.config["graphs"][graph]["file"]
        if self.config["attention"] != "plugin":
            return str(path)
        import onnx

        from jetspec_trt.plugins.onnx_op import with_reference_function

        model = with_reference_function(onnx.load(str(path)))
        return model.SerializeToString()

    # -- the two graphs -----------------------------------------------------------------------------------------

    def _empty_kv(self, shape: dict, count: int) -> list[np.ndarray]:
        return [np.zeros((1, shape["num_kv_heads"], 0, shape["head_dim"]), self.dtype) for _ in range(count)]

    def run_target(self, tokens: np.ndarray, positions: np.ndarray, packed_mask: np.ndarray, past: list[np.ndarray]):
        """Returns (logits [T, V] float32, features [T, F], present KV list)."""
        feeds = {"input_ids": tokens.astype(np.int64), "position_ids": positions.astype(np.int64),
                 "tree_mask": packed_mask.astype(np.int32)}
        feeds.update(zip(self.target_kv_names, past))
        logits, features, *present = self.target.run(self.target_outputs, feeds)
        return logits, features, present

    def run_draft(self, features: np.ndarray, context_positions: np.ndarray, block: np.ndarray,
                  positions: np.ndarray, past: list[np.ndarray]):
        """Returns (per-depth logits [B-1, V] float32, present KV = past + the new context)."""
        feeds = {"hidden_states": features, "context_position_ids": context_positions.astype(np.int64),
                 "input_ids": block.astype(np.int64), "position_ids": positions.astype(np.int64),
                 "tree_mask": causal_mask(len(block)).numpy()}
        feeds.update(zip(self.draft_kv_names, past))
        logits, *present = self.draft.run(self.draft_outputs, feeds)
        return logits, present

    # -- decoding ------------------------------------------------------------------------------------------------

    def draft_depth_logits(self, anchor: int, position: int, max_depth: int) -> torch.Tensor:
        """Append the pending context to the head's KV and draft [anchor, MASK...] at `position`:
        logits [max_depth, vocab]."""
        block_size = self.runtime.block_size
        block = np.full(block_size, self.runtime.mask_token_id, dtype=np.int64)
        block[0] = anchor
        features, context_positions = self._pending
        logits, self._draft_kv = self.run_draft(features, context_positions, block,
                                                position + np.arange(block_size), self._draft_kv)
        return torch.from_numpy(logits[:max_depth])

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 speculative: bool = True, tree: TreeConfig | None = None) -> Iterator[list[int]]:
        """Yield the new tokens of each round; `self.stats` describes the call once the iterator ends."""
        yield from run_rounds(self, prompt_ids, max_new_tokens, sampling, speculative, tree)

    # -- the graphs, for HostRounds ------------------------------------------------------------------------------

    def _prefill_logits(self, prompt_ids: list[int], capture: bool) -> torch.Tensor:
        n = len(prompt_ids)
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        kv = self._empty_kv(self.target_shape, len(self.target_kv_names))
        logits, features, self._kv = self.run_target(prompt, np.arange(n), causal_mask(n).numpy(), kv)
        self._draft_kv = self._empty_kv(self.draft_shape, len(self.draft_kv_names))
        self._pending = (features, np.arange(n))
        return torch.from_numpy(logits[-1])

    def _draft_logits(self, anchor: int, position: int, max_depth: int) -> torch.Tensor:
        return self.draft_depth_logits(anchor, position, max_depth)

    def _verify(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits, self._features, self._present = self.run_target(tokens.numpy(), positions.numpy(), mask.numpy(),
                                                                self._kv)
        return torch.from_numpy(logits)

    def _commit(self, path: list[int], position: int) -> None:
        # The context rows plus the accepted path's rows, in path order (ascending node indices).
        keep = np.concatenate([np.arange(position), position + np.asarray(path)])
        self._kv = [np.take(p, keep, axis=2) for p in self._present]
        self._pending = (self._features[path], position + np.arange(len(path)))

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                     speculative: bool = True, tree: TreeConfig | None = None) -> list[int]:
        return [t for tokens in self.generate(prompt_ids, max_new_tokens, sampling, speculative, tree) for t in tokens]
