"""Speed benchmark of the GPU engine: AR decoding, the split of one speculative round, projections, HF generate.

Everything is measured in one run on one device, so the ratios in the JSON are side by side:
  * AR: one graphed decode step at each context (CUDA events, median), and an end-to-end greedy generate
  * AR breakdown: the step's GEMMs alone against the weight-streaming floor, and per context the rest of the step
    (norms, RoPE, KV write, attention, residuals) per layer
  * sampled rounds (T=1) per budget and context, as a ratio to the greedy round
  * round split: draft / tree / verify / accept+compaction, per tree budget and context (graph replays); with
    compare_tree_kernel the same split again with the tree stage on the Triton tree kernels ("rounds_tree_kernel"),
    and with compare_small_m_gemm with the 2..64-row GEMMs on the skinny GEMM kernel ("rounds_small_m_gemm")
  * with compare_fp8, the same target as an FP8 checkpoint (write_fp8_target, loaded by the engine's FP8 loader)
    in the same process: its AR step (torch._scaled_mm and the FP8 GEMV), rounds and AR breakdown with the FP8
    weight-streaming floor, each row with its ratio to the bf16 one ("*_fp8" keys)
  * engine defaults: the AR step and the rounds once more as a built engine runs them (RuntimeConfig's default
    switches, the default tree's lookup chain, the draft over the build's draft vocabulary): "ar_step_defaults" and
    "rounds_defaults" (and "*_defaults_fp8"), the rows the issues' speed goals are read on; with
    compare_gemv_variants that AR step again with each decode-GEMV variant that is off by default
    ("ar_step_defaults_gated_gemv", "_gemv_pdl", "_gated_gemv_pdl")
  * projected tok/s = tau / round time, for tau values given (e.g. the paper's) and measured ones
  * Hugging Face transformers `generate` on the same shape and dtype
  * agreement: speculative greedy output vs the engine's own AR greedy output, over several prompts
"""

from __future__ import annotations

import datetime as dt
import functools
import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from jetspec_trt.bench.suites import diagnose_flip, ulp
from jetspec_trt.builders.quantize import DEFAULT_FP8_RECIPE, FP8_RECIPES
from jetspec_trt.dtypes import parse_dtype
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.draft_vocab import DEFAULT_DRAFT_VOCAB
from jetspec_trt.runtime.config import DEFAULT_TREE, RuntimeConfig, TreeConfig
from jetspec_trt.runtime.decoder import first_difference
from jetspec_trt.runtime.graph_decoder import STAGES, GraphDecoder
from jetspec_trt.versions import library_versions

# The PDL variant's prefetch (RuntimeConfig.gemv_pdl_prefetch): W columns per row, the H100 probe's best after
# small kernels of 5-17 us (bench/results/pdl-probe-h100.json)
GEMV_PDL_PREFETCH = 1024


@dataclass(frozen=True)
class BenchConfig:
    random_target: str = "qwen3-8b"
    device: str = "cuda"
    dtype: str = "bfloat16"
    budgets: tuple[int, ...] = (16, 32, 64, 128, 256)
    contexts: tuple[int, ...] = (512, 2048, 8192)
    topk: int = DEFAULT_TREE.topk
    max_depth: int = DEFAULT_TREE.max_depth
    taus: tuple[float, ...] = (10.76, 5.94)  # the paper's Qwen3-8B greedy tau on MATH-500 and MT-Bench
    ar_tokens: int = 128
    hf_tokens: int = 32
    hf_generate: bool = True
    agreement_prompts: int = 8
    agreement_tokens: int = 64
    reps: int = 30
    compile_layers: bool = True  # torch.compile the decoder layers (fuses norms, RoPE, activations)
    compare_gemv: bool = True  # also time the AR step with plugins.gemv for the single-token GEMMs
    compare_tree_kernel: bool = True  # also time the rounds with the tree stage on plugins.triton_tree_build
    compare_small_m_gemm: bool = True  # also time the rounds with the 2..64-row GEMMs on plugins.skinny_gemm
    compare_fused_layer_kernels: bool = True  # also time the AR step with plugins.layer_kernels' fused kernels
    compare_sampled: bool = True  # also time the rounds sampling at T=1 ("rounds_sampled")
    # also time the defaults' AR step with the decode-GEMV variants that are off by default (EngineBench.gemv_variants)
    compare_gemv_variants: bool = True
    # Kernel by kernel (bench.kernel_profile): the AR step and each round stage at the breakdown context under the
    # engines' default switches, with and without the fused layer kernels, and with the accept stage switched
    # between plugins.triton_accept and the torch ops ("kernel_profile").
    kernel_profile: bool = False
    # With kernel_profile and > 0: the same profile again with the draft proposing from this many tokens
    # (DraftHead.set_vocab; which ones does not change the time: the first N ids), "draft_vocab_<N>".
    draft_vocab: int = 0
    # Also time the same target as FP8 (write_fp8_target) after the bf16 sections: off by default, since it
    # builds a second engine (checkpoint written and loaded, layers compiled, graphs captured again).
    compare_fp8: bool = False
    fp8_recipe: str = DEFAULT_FP8_RECIPE  # the FP8 target's recipe (write_fp8_target): the build's default
    # Tokens the engine allows (its caches' size). None: the largest context plus the AR generate and some slack.
    # One engine serves every context, so each is timed in the engine a real deployment of that size would
    # have; a larger value times small contexts in a large engine (issue 16: a step must not depend on it).
    max_seq_len: int | None = None
    output_dir: Path = Path("bench/results")
    tag: str = ""


def _events_ms(fn, reps: int, before=None) -> float:
    """Median device time of fn() in ms over reps (after one warm-up), with `before()` untimed between."""
    times = []
    for i in range(reps + 1):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graphed(fn):
    """fn captured in a CUDA graph (after a warm-up, where the Triton kernels autotune, outside the capture); returns
    its replay."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class EngineBench:
    def __init__(self, cfg: BenchConfig, target, draft, hf_config):
        self.cfg = cfg
        self.target, self.draft, self.hf_config = target, draft, hf_config
        spec = draft.spec
        runtime = RuntimeConfig(
            tree=TreeConfig(max(cfg.budgets), cfg.topk, cfg.max_depth), dtype=cfg.dtype,
            max_seq_len=engine_tokens(cfg), block_size=spec.block_size,
            mask_token_id=spec.mask_token_id, target_layer_ids=spec.target_layer_ids, eos_token_ids=(),
            decode_gemv=False,  # "ar_step" is the cuBLAS step; cfg.compare_gemv adds the GEMV one beside it
            tree_kernel=False,  # "rounds" build the tree with torch ops; cfg.compare_tree_kernel adds the kernels'
            fused_layer_kernels=False,  # the layers' small ops unfused; cfg.compare_fused_layer_kernels adds them
        )
        self.decoder = GraphDecoder(target, draft, runtime, compile_layers=cfg.compile_layers)
        # Timings run at contexts nobody prefilled: give the caches realistic (non-zero) contents once.
        self.decoder.fill_caches(torch.Generator(device=cfg.device).manual_seed(1))

    def _at_context(self, context: int, state=None):
        def reset() -> None:
            self.decoder.reset(context)
            if state is not None:
                state.count.fill_(self.cfg.max_depth + 1)  # the longest append the draft stage can see
        return reset

    def ar_step_ms(self, context: int) -> float:
        token, step = self.decoder.ar_step()
        token.fill_(11)
        return _events_ms(step, self.cfg.reps, self._at_context(context))

    def ar_breakdown(self, context: int) -> dict:
        """Where the AR step's time goes: the weight bytes it must stream, the device's measured streaming rates
        (a plain read and a copy), the GEMMs alone (the step's GEMM sequence at M=1 in one graph, through
        plugins.linear as the model calls it: cuBLAS and plugins.gemv; on an FP8 target torch._scaled_mm and the
        FP8 GEMV on inputs quantized beforehand, gemm_sequence), and the rest of the step (norms, RoPE, KV write,
        attention, residuals, argmax), in all and per layer. The floor is the bytes over the faster rate: FP8
        weights count one byte each, so an FP8 target's floor is its own."""
        gemms, weight_bytes, inputs = self._target_gemms(1)
        device = gemms[0][0].device
        cublas = _graphed(gemm_sequence(gemms, inputs, use_gemv=False))
        triton_gemv = _graphed(gemm_sequence(gemms, inputs, use_gemv=True))
        big = torch.empty(4 * 2**30 // 2, dtype=torch.bfloat16, device=device).normal_()
        out = torch.empty_like(big)
        read_ms = _events_ms(lambda: big.sum(dtype=torch.float32), self.cfg.reps)
        copy_ms = _events_ms(lambda: out.copy_(big), self.cfg.reps)
        read_gbs = big.numel() * 2 / read_ms / 1e6
        copy_gbs = 2 * big.numel() * 2 / copy_ms / 1e6  # bytes read + written
        del big, out
        step = self.ar_step_ms(context)
        gemm_ms = _events_ms(cublas, self.cfg.reps)
        gemv_ms = _events_ms(triton_gemv, self.cfg.reps)
        floor_ms = weight_bytes / max(read_gbs, copy_gbs) / 1e6
        return {"context": context, "weight_bytes": weight_bytes, "read_GBps": read_gbs, "copy_GBps": copy_gbs,
                "floor_ms": floor_ms, "step_ms": step, "floor_share": floor_ms / step,
                "gemms_cublas_ms": gemm_ms, "gemms_cublas_GBps": weight_bytes / gemm_ms / 1e6,
                "gemms_gemv_ms": gemv_ms, "gemms_gemv_GBps": weight_bytes / gemv_ms / 1e6,
                **self.rest_of_step(step, gemm_ms)}

    def rest_of_step(self, step_ms: float, gemms_ms: float) -> dict:
        """The step's non-GEMM time (the step less its GEMMs alone), in all and per layer (the lm_head's argmax
        and the step's few once-per-step kernels are counted in the layers' share)."""
        rest = step_ms - gemms_ms
        return {"rest_of_step_ms": rest, "rest_per_layer_us": 1000 * rest / len(self.target.layers)}

    def ar_step_row(self, context: int, breakdown: dict, gemms: str = "gemms_cublas_ms") -> dict:
        """The AR step at `context` under the decoder's current switches: ms, tok/s, the share of it the
        weight-streaming floor is (floor_share; 1.0 would be the floor), and the rest of the step beside
        breakdown[gemms] (the GEMMs alone on the kernels this step runs)."""
        ms = self.ar_step_ms(context)
        return {"context": context, "step_ms": ms, "tok_s": 1000 / ms, "floor_share": breakdown["floor_ms"] / ms,
                **self.rest_of_step(ms, breakdown[gemms])}

    def ar_steps_and_rounds(self, breakdown: dict, progress, gemms: str = "gemms_cublas_ms",
                            tree_at=None) -> tuple[list[dict], list[dict]]:
        """The AR step under the decoder's current switches (ar_step_row; `gemms`: the breakdown's GEMMs it runs,
        cuBLAS by default) and the round split at every (context, budget), with the round's ratio to the step and
        its projected tok/s at the config's taus. `tree_at(budget)`: the round's tree (default: the plain one)."""
        steps, rounds = [], []
        for context in self.cfg.contexts:
            steps.append(step := self.ar_step_row(context, breakdown, gemms))
            progress.update()
            for budget in self.cfg.budgets:
                split = self.round_split_ms(budget, context, tree_at and tree_at(budget))
                split.update(budget=budget, context=context, vs_ar_step=split["round_ms"] / step["step_ms"],
                             projected_tok_s={str(tau): 1000 * tau / split["round_ms"] for tau in self.cfg.taus})
                rounds.append(split)
                progress.set_postfix(budget=budget, context=context, round_ms=f"{split['round_ms']:.2f}")
                progress.update()
        return steps, rounds

    def _target_gemms(self, rows: int) -> tuple[list[tuple], int, dict[int, torch.Tensor]]:
        """The GEMMs a target pass runs, in order, as the model calls them (fused QKV, o_proj, gate-up, down per
        layer, then the lm_head): (weight [N, K], weight_scale, input_scale), the scales None but for FP8
        weights; their bytes, and a random [rows, K] input per K in the model's activation dtype."""
        gemms = []
        for layer in self.target.layers:
            attn, mlp = layer.self_attn, layer.mlp
            gemms += [(attn.qkv_weight, attn.qkv_weight_scale, attn.qkv_input_scale),
                      (attn.o_proj.weight, attn.o_proj.weight_scale, attn.o_proj.input_scale),
                      (mlp.gate_up_weight, mlp.gate_up_weight_scale, mlp.gate_up_input_scale),
                      (mlp.down_proj.weight, mlp.down_proj.weight_scale, mlp.down_proj.input_scale)]
        gemms.append((self.target.lm_head.weight, None, None))
        weight_bytes = sum(w.numel() * w.element_size() for w, _, _ in gemms)
        dtype, device = self.target.embed_tokens.weight.dtype, self.target.embed_tokens.weight.device
        return gemms, weight_bytes, {k: torch.randn(rows, k, dtype=dtype, device=device)
                                     for k in {w.shape[1] for w, _, _ in gemms}}

    def verify_gemms(self, rows: tuple[int, ...] = (64, 128, 256)) -> dict:
        """A verify's GEMMs alone (the target's GEMM sequence in one graph, as the model calls it on cuBLAS) at
        each tree size, against the device's bf16 matrix rate measured here (one 8192-cube GEMM): issue 16 asks
        for >= 70 % of it at 64-256 tree tokens. Rows of few tokens are weight-streaming bound, so each row also
        gives the weights' rate."""
        size = 8192
        a = torch.randn(size, size, dtype=torch.bfloat16, device=self.target.embed_tokens.weight.device)
        b = torch.randn_like(a)
        square_ms = _events_ms(_graphed(lambda: torch.mm(a, b)), self.cfg.reps)
        matrix_tflops = 2 * size**3 / square_ms / 1e9
        del a, b
        out = {"matrix_TFLOPs": matrix_tflops, "rows": []}
        for m in rows:
            gemms, weight_bytes, inputs = self._target_gemms(m)
            ms = _events_ms(_graphed(gemm_sequence(gemms, inputs, use_gemv=False)), self.cfg.reps)
            flops = 2 * m * sum(w.numel() for w, _, _ in gemms)
            tflops = flops / ms / 1e9
            out["rows"].append({"rows": m, "ms": ms, "TFLOPs": tflops, "matrix_share": tflops / matrix_tflops,
                                "weight_GBps": weight_bytes / ms / 1e6})
        return out

    def small_m_gemms(self, rows: tuple[int, ...] = (16, 32, 64)) -> list[dict]:
        """A verify's GEMMs alone at each row count (the target's GEMM sequence in one graph), cuBLAS beside
        plugins.skinny_gemm: the weight-streaming rate each reaches, as ar_breakdown gives it for one row."""
        from jetspec_trt.plugins.skinny_gemm import skinny_gemm

        out = []
        for m in rows:
            gemms, weight_bytes, inputs = self._target_gemms(m)
            weights = [w for w, _, _ in gemms]  # bf16 targets only (the skinny GEMM has no FP8 variant)
            cublas = _graphed(lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights])
            skinny = _graphed(lambda: [skinny_gemm(inputs[w.shape[1]], w, None) for w in weights])
            cublas_ms, skinny_ms = _events_ms(cublas, self.cfg.reps), _events_ms(skinny, self.cfg.reps)
            out.append({"rows": m, "weight_bytes": weight_bytes,
                        "cublas_ms": cublas_ms, "cublas_GBps": weight_bytes / cublas_ms / 1e6,
                        "skinny_ms": skinny_ms, "skinny_GBps": weight_bytes / skinny_ms / 1e6})
        return out

    def _stages_at(self, tree: TreeConfig, context: int):
        """A tree bucket's captured stages at `context`, each with the untimed `before()` that resets the context
        and runs the earlier stages, so that the stage sees its real inputs."""
        state, stages = self.decoder.stages(tree)
        state.anchor.fill_(11)
        reset = self._at_context(context, state)
        for name in STAGES:
            def before(earlier=STAGES[: STAGES.index(name)]) -> None:
                reset()
                for prior in earlier:
                    stages[prior]()

            yield name, stages[name], before

    def round_split_ms(self, budget: int, context: int, tree: TreeConfig | None = None) -> dict[str, float]:
        tree = tree or TreeConfig(budget, self.cfg.topk, self.cfg.max_depth)
        result = {f"{name}_ms": _events_ms(stage, self.cfg.reps, before)
                  for name, stage, before in self._stages_at(tree, context)}
        result["round_ms"] = self.round_ms(budget, context, tree=tree)
        if tree.lookup:
            result["lookup"] = tree.lookup
        return result

    def default_tree(self, budget: int) -> TreeConfig:
        """The engines' default tree at `budget` nodes (DEFAULT_TREE's lookup chain fitted to it), at the
        config's width and depth."""
        lookup = DEFAULT_TREE.fitted(budget, self.cfg.max_depth).lookup
        return TreeConfig(budget, self.cfg.topk, self.cfg.max_depth, lookup)

    def use_engine_defaults(self, draft_vocab: bool = False) -> dict:
        """The decoder's switches as a built engine has them (RuntimeConfig's defaults, returned); with
        `draft_vocab`, the draft over the build's default draft vocabulary too (its first ids: which ones does not
        change the time), where the target's vocabulary is larger than that (as the build chooses)."""
        defaults = engine_switches()
        self.decoder.set_decode_gemv(defaults["decode_gemv"], defaults["gated_gemv"], defaults["gemv_pdl_prefetch"])
        self.decoder.set_tree_kernel(defaults["tree_kernel"])
        self.decoder.set_small_m_gemm(defaults["small_m_gemm"])
        self.decoder.set_fused_layer_kernels(defaults["fused_layer_kernels"])
        self.decoder.set_fused_accept(defaults["fused_accept"])
        if draft_vocab and self.target.config.vocab_size > DEFAULT_DRAFT_VOCAB:
            self.decoder.set_draft_vocab(torch.arange(DEFAULT_DRAFT_VOCAB))
        return defaults

    def engine_default_rows(self, breakdown: dict, progress) -> tuple[list[dict], list[dict]]:
        """ar_steps_and_rounds as a built engine runs (use_engine_defaults with its draft vocabulary, the default
        tree at each budget); the decoder keeps those switches."""
        gemms = "gemms_gemv_ms" if self.use_engine_defaults(draft_vocab=True)["decode_gemv"] else "gemms_cublas_ms"
        return self.ar_steps_and_rounds(breakdown, progress, gemms, self.default_tree)

    def gemv_variants(self, breakdown: dict, reference: list[dict]) -> dict:
        """The engines' default AR step (use_engine_defaults) with each decode-GEMV variant that is off by default:
        the MLP's activation inside the down GEMV ("gated_gemv"), the GEMVs as programmatic dependents of the norms
        and the attention, GEMV_PDL_PREFETCH columns prefetched ("gemv_pdl"), and both; each row beside `reference`
        (ar_step_defaults: vs_defaults), with the greedy agreement of the rounds against that AR step. The decoder
        is left at the defaults."""
        self.use_engine_defaults(draft_vocab=True)
        out = {}
        for name, gated, prefetch in (("gated_gemv", True, 0), ("gemv_pdl", False, GEMV_PDL_PREFETCH),
                                      ("gated_gemv_pdl", True, GEMV_PDL_PREFETCH)):
            self.decoder.set_decode_gemv(True, gated, prefetch)
            rows = [self.ar_step_row(c, breakdown, "gemms_gemv_ms") for c in self.cfg.contexts]
            out[f"ar_step_defaults_{name}"] = _beside(rows, reference, "step_ms", "vs_defaults")
            out[f"agreement_defaults_{name}"] = self.agreement()
        self.use_engine_defaults(draft_vocab=True)
        return out

    def kernel_profile(self, context: int) -> dict:
        """The AR step and each stage of a round at every budget of the config, kernel by kernel
        (bench.kernel_profile), under the decoder's current switches. The rounds build the engines' default tree
        (DEFAULT_TREE's lookup chain fitted to the budget, at the config's width and depth)."""
        from jetspec_trt.bench.kernel_profile import profile_kernels, summarize

        token, step = self.decoder.ar_step()
        token.fill_(11)
        reset = self._at_context(context)
        step_ms = _events_ms(step, self.cfg.reps, reset)
        out = {"context": context, "ar_step": summarize(profile_kernels(step, reset), step_ms)}
        out["rounds"] = []
        for budget in self.cfg.budgets:
            tree = self.default_tree(budget)
            stages = {name: summarize(profile_kernels(stage, before), _events_ms(stage, self.cfg.reps, before))
                      for name, stage, before in self._stages_at(tree, context)}
            round_ms = self.round_ms(budget, context, tree=tree)
            out["rounds"].append({"budget": budget, "lookup": tree.lookup, "round_ms": round_ms,
                                  "vs_ar_step": round_ms / step_ms, "stages": stages})
        return out

    def round_splits(self, tree_at=None) -> list[dict]:
        """round_split_ms at every (context, budget) of the config: a side-by-side run of the rounds with some
        switch of the decoder flipped. `tree_at(budget)`: the round's tree (default: the plain one)."""
        return [dict(self.round_split_ms(budget, context, tree_at and tree_at(budget)), budget=budget, context=context)
                for context in self.cfg.contexts for budget in self.cfg.budgets]

    def round_ms(self, budget: int, context: int, mode: str = "greedy", tree: TreeConfig | None = None) -> float:
        """One whole round (the stages replayed back to back) in a sampling mode (GraphDecoder.stages); "sample"
        draws at the decoder's temperature, 1 unless a request set another. `tree`: another tree than the
        config's plain one at `budget`."""
        tree = tree or TreeConfig(budget, self.cfg.topk, self.cfg.max_depth)
        state, stages = self.decoder.stages(tree, mode)
        state.anchor.fill_(11)

        def whole_round() -> None:
            for name in STAGES:
                stages[name]()

        return _events_ms(whole_round, self.cfg.reps, self._at_context(context, state))

    def _timed_generate(self, prompt_len: int, **kwargs):
        """One generate() of cfg.ar_tokens new tokens after a short warm-up (capture) on the same prompt;
        returns its DecodeStats (wall times with the host loop included)."""
        prompt = torch.randint(0, self.target.config.vocab_size, (prompt_len,)).tolist()
        list(self.decoder.generate(prompt, 8, **kwargs))  # warm-up
        torch.cuda.synchronize()
        list(self.decoder.generate(prompt, self.cfg.ar_tokens, **kwargs))
        return self.decoder.stats

    def ar_generate_tok_s(self, prompt_len: int = 128) -> dict:
        stats = self._timed_generate(prompt_len, speculative=False)
        return {"prompt_tokens": prompt_len, "new_tokens": stats.new_tokens, "decode_s": stats.decode_s,
                "decode_tok_s": (stats.new_tokens - 1) / stats.decode_s}

    def generate_round_ms(self, budget: int, prompt_len: int = 128) -> dict:
        """Wall time per round inside generate(), host loop included (what a user's request pays per verify),
        beside the same for the AR step: the stage timings above are device time of graphs replayed alone."""
        stats = self._timed_generate(prompt_len, tree=TreeConfig(budget, self.cfg.topk, self.cfg.max_depth))
        return {"budget": budget, "rounds": stats.rounds, "tokens": stats.new_tokens,
                "ms_per_round": 1000 * stats.decode_s / max(1, stats.rounds)}

    def agreement(self) -> dict:
        """Speculative greedy vs the engine's AR greedy: identical sequences; otherwise the first divergence, each
        diagnosed as the suite bench does (diagnose_flip: the target's teacher-forced logits there): random weights
        give near-flat logits, so bf16 runs part at near ties, and a divergence that is not one would be a bug."""
        generator = torch.Generator().manual_seed(7)
        identical, divergences, diagnoses = 0, [], []
        for _ in range(self.cfg.agreement_prompts):
            prompt = torch.randint(0, self.target.config.vocab_size, (64,), generator=generator).tolist()
            ar = [t for c in self.decoder.generate(prompt, self.cfg.agreement_tokens, speculative=False) for t in c]
            spec = [t for c in self.decoder.generate(prompt, self.cfg.agreement_tokens) for t in c]
            if ar == spec:
                identical += 1
            else:
                divergences.append(first := first_difference(ar, spec))
                diagnoses.append(diagnose_flip(self.target, prompt, ar, spec, first))
        gaps = [abs(d["ar_minus_spec"]) / ulp(d["top1_logit"], self.target.embed_tokens.weight.dtype)
                for d in diagnoses if d["ar_minus_spec"] is not None]
        return {"prompts": self.cfg.agreement_prompts, "tokens": self.cfg.agreement_tokens,
                "identical": identical, "first_divergence_at": divergences,
                "diverged_near_tie": sum(d["near_tie"] for d in diagnoses),
                "max_ar_minus_spec_ulps": max(gaps, default=None)}


def gemm_sequence(gemms: list[tuple], inputs: dict[int, torch.Tensor], use_gemv: bool):
    """A function running `gemms` (EngineBench._target_gemms: weight, weight_scale, input_scale) one after another
    on `inputs` (one [rows, K] per K) as the model's linear layers do (plugins.linear), on cuBLAS or (`use_gemv`)
    the GEMV kernels. An FP8 weight's input is quantized here, once, and the function runs fp8_matmul alone: the
    compiled layers fuse that quantization into the ops before each GEMM; timed here unfused, it is the likely
    reason the GEMMs alone came out longer than the whole step (lease 15, H100: 5.60 ms of FP8 GEMV against a
    4.66 ms step; not rerun since)."""
    from jetspec_trt.plugins.fp8_gemm import fp8_matmul, input_scale_of, quantize
    from jetspec_trt.plugins.linear import linear

    calls = []
    for weight, weight_scale, input_scale in gemms:
        x = inputs[weight.shape[1]]
        if weight_scale is None:
            calls.append(functools.partial(linear, x, weight, None, use_gemv))
        else:
            x_scale = input_scale_of(x, input_scale)
            calls.append(functools.partial(fp8_matmul, quantize(x, x_scale), x_scale, weight, None, weight_scale,
                                           input_scale is not None, use_gemv, x.dtype))
    return lambda: [call() for call in calls]


def engine_switches() -> dict:
    """RuntimeConfig's defaults by field name: the switches a built engine runs with."""
    return {f.name: f.default for f in fields(RuntimeConfig)}


def engine_tokens(cfg: BenchConfig) -> int:
    """The bench engine's max_seq_len: cfg.max_seq_len, or the largest context plus the AR generate and slack."""
    needed = max(cfg.contexts) + cfg.ar_tokens + 64
    if cfg.max_seq_len is not None and cfg.max_seq_len < max(cfg.contexts) + 1:
        raise JetSpecError(f"--max-seq-len {cfg.max_seq_len} cannot hold context {max(cfg.contexts)} and a step")
    return cfg.max_seq_len if cfg.max_seq_len is not None else needed


def hf_generate_tok_s(hf_config, dtype: torch.dtype, device: str, new_tokens: int) -> dict:
    """Hugging Face transformers `generate` (greedy, its default cache) on a random model of the same shape."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    try:
        prompt = torch.randint(0, hf_config.vocab_size, (1, 128), device=device)
        kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
        return {"new_tokens": new_tokens, "seconds": seconds, "tok_s": new_tokens / seconds}
    finally:
        del model
        torch.cuda.empty_cache()


@torch.inference_mode()
def run_bench(cfg: BenchConfig, command: list[str] | None = None) -> Path:
    from jetspec_trt.models.fp8 import read_fp8_format
    from jetspec_trt.models.presets import random_models

    if cfg.compare_fp8:
        require_fp8_gpu(cfg.device)
    if not torch.cuda.is_available():
        raise JetSpecError("the engine benchmark needs a CUDA GPU (run it through the device machine)")
    # The engine, then each context's step and rounds twice (the bench's switches, the engines' defaults)
    sections = 1 + 2 * len(cfg.contexts) * (1 + len(cfg.budgets))
    progress = tqdm(total=2 + sections * (1 + cfg.compare_fp8) + int(cfg.hf_generate) + int(cfg.kernel_profile)
                    + int(cfg.compare_gemv_variants),
                    desc="bench")
    target, draft, hf_config = random_models(cfg.random_target, cfg.device, parse_dtype(cfg.dtype))
    target.fuse_weights()
    draft.fuse_weights()
    bench = EngineBench(cfg, target, draft, hf_config)
    progress.update()
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "versions": library_versions("jetspec_trt", "torch", "cuda", "triton", "transformers", "python"),
        "command": command or [],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "config": _jsonable(asdict(cfg)),
        "model": f"{cfg.random_target} (random weights)",
        "attention": "triton" if bench.decoder.triton_kernels else "torch reference (whole-cache, no Triton kernel)",
    }
    report["engine_max_seq_len"] = bench.decoder.runtime.max_seq_len
    report["ar_breakdown"] = breakdown = bench.ar_breakdown(breakdown_context(cfg))
    report["ar_step"], report["rounds"] = bench.ar_steps_and_rounds(breakdown, progress)
    # Sampled rounds (T=1) beside greedy ones: what a chat request pays per round.
    greedy_ms = {(r["budget"], r["context"]): r["round_ms"] for r in report["rounds"]}
    if cfg.compare_sampled:
        report["rounds_sampled"] = [
            {"budget": b, "context": c, "mode": "sample", "temperature": 1.0, "round_ms": ms,
             "vs_greedy_round": ms / greedy_ms[b, c]}
            for c in cfg.contexts for b in cfg.budgets for ms in (bench.round_ms(b, c, "sample"),)]
    report["ar_generate"] = ar = bench.ar_generate_tok_s()
    ar_ms = 1000 / ar["decode_tok_s"]
    report["generate_rounds"] = [dict(r, vs_ar_generate_step=r["ms_per_round"] / ar_ms)
                                 for r in (bench.generate_round_ms(b) for b in cfg.budgets)]
    progress.update()
    if cfg.compare_gemv:  # the same AR step with the single-token GEMMs on plugins.gemv instead of cuBLAS
        bench.decoder.set_decode_gemv(True)
        report["ar_step_gemv"] = [bench.ar_step_row(c, breakdown, "gemms_gemv_ms") for c in cfg.contexts]
        report["ar_generate_gemv"] = bench.ar_generate_tok_s()
        bench.decoder.set_decode_gemv(False)
    if cfg.compare_fused_layer_kernels:  # the cuBLAS AR step again, its layers' small ops on the fused kernels
        bench.decoder.set_fused_layer_kernels(True)
        report["ar_step_fused_layer_kernels"] = [bench.ar_step_row(c, breakdown) for c in cfg.contexts]
        bench.decoder.set_fused_layer_kernels(False)
    if cfg.compare_tree_kernel and bench.decoder.triton_kernels:
        # The same rounds with the tree stage on the Triton kernels, and their greedy agreement with AR.
        bench.decoder.set_tree_kernel(True)
        report["rounds_tree_kernel"] = bench.round_splits()
        report["agreement_tree_kernel"] = bench.agreement()
        bench.decoder.set_tree_kernel(False)
    if cfg.compare_small_m_gemm and bench.decoder.triton_kernels:
        # The same rounds with the 2..64-row GEMMs (verify at budgets <= 64, the draft) on plugins.skinny_gemm.
        report["small_m_gemms"] = bench.small_m_gemms()
        bench.decoder.set_small_m_gemm(True)
        report["rounds_small_m_gemm"] = bench.round_splits()
        report["agreement_small_m_gemm"] = bench.agreement()
        bench.decoder.set_small_m_gemm(False)
    report["agreement"] = bench.agreement()
    report["verify_gemms"] = bench.verify_gemms()
    progress.update()
    report["ar_step_defaults"], report["rounds_defaults"] = bench.engine_default_rows(breakdown, progress)
    report["agreement_defaults"] = bench.agreement()
    if cfg.compare_gemv_variants and bench.decoder.triton_kernels:
        report.update(bench.gemv_variants(breakdown, report["ar_step_defaults"]))
        progress.update()
    if cfg.kernel_profile and bench.decoder.triton_kernels:
        # Kernel by kernel under the engines' default switches (RuntimeConfig), then with the fused layer kernels.
        defaults = bench.use_engine_defaults()
        bench.decoder.set_draft_vocab(None)
        context = breakdown_context(cfg)
        report["kernel_profile"] = {}
        for fused in (defaults["fused_layer_kernels"], not defaults["fused_layer_kernels"]):
            bench.decoder.set_fused_layer_kernels(fused)
            key = "fused_layer_kernels" if fused else "unfused_layer_kernels"
            report["kernel_profile"][key] = bench.kernel_profile(context)
        bench.decoder.set_fused_layer_kernels(defaults["fused_layer_kernels"])
        if cfg.draft_vocab:  # the engines' defaults again, the draft over a vocabulary of its own
            bench.decoder.set_draft_vocab(torch.arange(cfg.draft_vocab))
            report["kernel_profile"][f"draft_vocab_{cfg.draft_vocab}"] = bench.kernel_profile(context)
            bench.decoder.set_draft_vocab(None)
        # The defaults with the accept stage switched (plugins.triton_accept's kernels against the torch ops).
        bench.decoder.set_fused_accept(not defaults["fused_accept"])
        key = "unfused_accept" if defaults["fused_accept"] else "fused_accept"
        report["kernel_profile"][key] = bench.kernel_profile(context)
        bench.decoder.set_fused_accept(defaults["fused_accept"])
        progress.update()
    if cfg.compare_fp8:
        # The bf16 sections on disk now (rewritten at the end): a second engine is built next, and a run cut short
        # (a lease's time) or an FP8 failure should not take them along.
        write_report(report, cfg)
        with tempfile.TemporaryDirectory(prefix="jetspec-bench-fp8-") as tmp:
            start = time.perf_counter()
            write_fp8_target(target, hf_config, Path(tmp), parse_dtype(cfg.dtype), cfg.fp8_recipe)
            # The bf16 sections are done: free their engine (weights, caches, captured graphs) before the FP8 one
            # is built, so the two never hold the device at once (8B: 16 GB of weights plus graph pools each).
            del bench, target
            gc.collect()
            torch.cuda.empty_cache()
            fmt, tail = read_fp8_format(Path(tmp)), FP8_RECIPES[cfg.fp8_recipe].unquantized_tail_mlps
            report["fp8"] = {"format": fmt.describe(), "recipe": cfg.fp8_recipe,
                             # the static input scales' amax; None for per-token (dynamic) activations
                             "input_amax": FP8_INPUT_AMAX if fmt.activation_scheme == "static" else None,
                             "quantized": "the decoder layers' projections",
                             "unquantized": FP8_UNQUANTIZED + (f", the last {tail} layers' MLPs" if tail else ""),
                             # the draft head, and whatever the bf16 engine did not give back
                             "allocated_before_fp8_GB": torch.cuda.memory_allocated() / 2**30}
            bench = fp8_bench(cfg, Path(tmp), draft, hf_config)
            report["fp8"]["convert_and_load_s"] = time.perf_counter() - start
        progress.update()
        report.update(fp8_sections(bench, report, progress))
        del bench
    if cfg.hf_generate:
        write_report(report, cfg)  # everything above on disk before HF builds its own copy of the model
        report["hf_generate"] = hf_generate_tok_s(hf_config, parse_dtype(cfg.dtype), cfg.device, cfg.hf_tokens)
        progress.update()
    progress.close()
    return write_report(report, cfg)


def breakdown_context(cfg: BenchConfig) -> int:
    """The context the AR breakdown is taken at: 2048 where timed, else the first."""
    return 2048 if 2048 in cfg.contexts else cfg.contexts[0]


# ---- the FP8 comparison (compare_fp8) ---------------------------------------------------------------------------

# The static activation scale of the bench's per-tensor FP8 target is FP8_INPUT_AMAX / 448 for every projection,
# standing in for modelopt's calibrated per-Linear amax (speed does not depend on the values). 64 bounds the random
# presets' projection inputs with room (tiny preset: normed inputs about 4-5, down_proj's up to 29), so none
# saturates and the small ones stay in e4m3's normal range. Per-channel recipes have no input scale (per token).
FP8_INPUT_AMAX = 64.0
FP8_PRODUCER = "jetspec-trt bench (random weights, uncalibrated)"
FP8_UNQUANTIZED = "embeddings, lm_head, norms, the draft head"  # as `build --quantize fp8` leaves them


def require_fp8_gpu(device: str) -> None:
    """JetSpecError unless `device` is a CUDA GPU with FP8 tensor cores (models.fp8.require_fp8_device, which
    lets a CPU pass: the bench times the GPU's FP8 kernels, so the CPU's reference kernels do not count)."""
    from jetspec_trt.models.fp8 import MIN_CAPABILITY, require_fp8_device

    needs = f"a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada, Hopper or newer)"
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise JetSpecError(f"--fp8 times FP8 GEMMs on the GPU: it needs {needs}, and there is no CUDA GPU here")
    try:
        require_fp8_device(device)
    except JetSpecError:
        major, minor = torch.cuda.get_device_capability(device)
        raise JetSpecError(f"--fp8 needs {needs}: {torch.cuda.get_device_name(device)} is {major}.{minor}, "
                           "without FP8 tensor cores (drop --fp8)") from None


def write_fp8_target(target, hf_config, out_dir: Path, dtype: torch.dtype, recipe: str = DEFAULT_FP8_RECIPE,
                     input_amax: float = FP8_INPUT_AMAX) -> Path:
    """`target` (a TargetModel, any device) written to `out_dir` as the FP8 checkpoint `build --quantize fp8
    --fp8-recipe <recipe>` makes (a key of builders.quantize.FP8_RECIPES; by default the build's default,
    per-channel-tail-bf16), in the Hugging Face layout the engine's FP8 loader reads (models/fp8.py; load with
    models.checkpoint.load_target), without calibration. Every projection of the decoder layers (the
    models.layers.Linear modules, the only ones that can hold FP8 weights) but the MLPs the recipe keeps (the last
    3 layers' for -tail-bf16, listed in `ignore` as modelopt lists them) is e4m3:
    - per-channel recipes: weight_scale = amax(|W_row|) / 448 per output row ([N]), no input_scale (dynamic,
      per-token activations; quant_algo FP8_PER_CHANNEL_PER_TOKEN);
    - per-tensor: weight_scale = amax(|W|) / 448, the amax shared by each group the engine fuses into one GEMM
      (q/k/v, gate/up: as builders.quantize shares it before modelopt's export, so the loader fuses without
      requantizing), and a static input_scale = input_amax / 448 (quant_algo FP8).
    Embeddings, lm_head, norms and kept MLPs in `dtype`. The draft head stays unquantized, as in an FP8 engine.
    Returns out_dir."""
    from safetensors.torch import save_file

    from jetspec_trt.models.fp8 import PER_CHANNEL
    from jetspec_trt.models.fused_layout import GROUPS
    from jetspec_trt.models.layers import Linear
    from jetspec_trt.plugins.fp8_gemm import FP8_MAX, quantize

    fp8_recipe = FP8_RECIPES[recipe]
    per_channel = fp8_recipe.weight_scales == PER_CHANNEL
    num_layers = len(target.layers)
    kept = [f"layers.{i}.mlp" for i in range(max(0, num_layers - fp8_recipe.unquantized_tail_mlps), num_layers)]
    groups: dict[str, list[str]] = {}  # fused GEMM (or lone projection) -> the projections it runs
    modules = dict(target.named_modules())
    for name, module in modules.items():
        if isinstance(module, Linear) and not any(name.startswith(f"{mlp}.") for mlp in kept):
            parent, projection = name.rsplit(".", 1)
            group = next((g for g in GROUPS if parent.endswith(g.module) and projection in g.parts), None)
            groups.setdefault(f"{parent}.{group.fused}" if group else name, []).append(name)
    quantized = {f"{name}.weight" for names in groups.values() for name in names}
    # copy=True: a tensor already on the CPU in `dtype` (a tied or fused one) must not share storage in the file
    state = {name: tensor.to("cpu", dtype, copy=True) for name, tensor in target.state_dict().items()
             if name not in quantized}
    if hf_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the embedding (the loader re-ties)
    tiny = torch.finfo(torch.float32).tiny
    for names in groups.values():
        weights = [modules[name].weight.detach() for name in names]
        if per_channel:  # one scale per row: a fused group's concatenate with its rows, nothing to share
            scales = [(w.abs().amax(dim=1).float() / FP8_MAX).clamp(min=tiny) for w in weights]
        else:  # one amax per group
            scales = [(torch.stack([w.abs().max().float() for w in weights]).max() / FP8_MAX).clamp(min=tiny)]
            scales *= len(weights)
        for name, weight, scale in zip(names, weights, scales):
            state[f"{name}.weight"] = quantize(weight, scale[:, None] if per_channel else scale).cpu()
            state[f"{name}.weight_scale"] = scale.to("cpu", copy=True)
            if not per_channel:
                state[f"{name}.input_scale"] = torch.tensor(input_amax / FP8_MAX, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Hugging Face prefixes, as modelopt's export writes them (the loader strips "model.")
    save_file({(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in state.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    quant = {"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN" if per_channel else "FP8",
             "ignore": ["lm_head", *(f"model.{mlp}*" for mlp in kept)], "producer": FP8_PRODUCER}
    config = hf_config.to_dict() | {"quantization_config": quant}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def fp8_bench(cfg: BenchConfig, checkpoint: Path, draft, hf_config) -> EngineBench:
    """The bench's engine over the FP8 checkpoint at `checkpoint`, loaded as an FP8 engine loads its target (FP8
    weights, q/k/v and gate/up fused), with the same bf16 draft head."""
    from jetspec_trt.models.checkpoint import load_target

    target = load_target(checkpoint, parse_dtype(cfg.dtype), cfg.device, fused_gemm=True, keep_fp8=True)
    return EngineBench(cfg, target, draft, hf_config)


def fp8_sections(bench: EngineBench, report: dict, progress) -> dict:
    """The FP8 engine's rows, each beside its bf16 row in `report` as vs_bf16 (FP8 / bf16 time): the AR
    breakdown with the FP8 floor, the step and the rounds on torch._scaled_mm (as "ar_step" and "rounds"; the
    rounds again on the tree kernels where the bf16 ones were), the step on the FP8 GEMV and an end-to-end AR
    generate on it (what FP8 engines run by default)."""
    cfg, out = bench.cfg, {}
    breakdown = bench.ar_breakdown(breakdown_context(cfg))
    out["ar_breakdown_fp8"] = dict(breakdown, vs_bf16=_ratios(breakdown, report["ar_breakdown"], (
        "weight_bytes", "floor_ms", "step_ms", "gemms_cublas_ms", "gemms_gemv_ms", "rest_of_step_ms")))
    steps, rounds = bench.ar_steps_and_rounds(breakdown, progress)
    out["ar_step_fp8"] = _beside(steps, report["ar_step"], "step_ms")
    out["rounds_fp8"] = _beside(rounds, report["rounds"], "round_ms")
    if "rounds_tree_kernel" in report:  # the rounds as engines run them by default: the tree stage on the kernels
        bench.decoder.set_tree_kernel(True)
        out["rounds_tree_kernel_fp8"] = _beside(bench.round_splits(), report["rounds_tree_kernel"], "round_ms")
        bench.decoder.set_tree_kernel(False)
    bench.decoder.set_decode_gemv(True)
    gemv_steps = [bench.ar_step_row(c, breakdown, "gemms_gemv_ms") for c in cfg.contexts]
    out["ar_step_gemv_fp8"] = _beside(gemv_steps, report.get("ar_step_gemv", []), "step_ms")
    generate = bench.ar_generate_tok_s()
    if "ar_generate_gemv" in report:
        generate["vs_bf16_tok_s"] = generate["decode_tok_s"] / report["ar_generate_gemv"]["decode_tok_s"]
    out["ar_generate_gemv_fp8"] = generate
    bench.decoder.set_decode_gemv(False)
    steps, rounds = bench.engine_default_rows(breakdown, progress)
    out["ar_step_defaults_fp8"] = _beside(steps, report["ar_step_defaults"], "step_ms")
    out["rounds_defaults_fp8"] = _beside(rounds, report["rounds_defaults"], "round_ms")
    out["agreement_defaults_fp8"] = bench.agreement()
    # The defaults' rounds once more with the small-M switch on: verify's 2..64-row FP8 GEMMs on the skinny GEMM's
    # FP8 kernel (float32 sums like the GEMV's) instead of rowwise _scaled_mm, beside the defaults' rows.
    bench.decoder.set_small_m_gemm(True)
    out["rounds_defaults_small_m_fp8"] = _beside(bench.round_splits(bench.default_tree), out["rounds_defaults_fp8"],
                                                 "round_ms", "vs_defaults")
    out["agreement_defaults_small_m_fp8"] = bench.agreement()
    return out


def _ratios(row: dict, reference: dict, keys) -> dict:
    return {key: row[key] / reference[key] for key in keys if reference.get(key)}


def _beside(rows: list[dict], reference: list[dict], key: str, name: str = "vs_bf16") -> list[dict]:
    """Each row with `name` = row[key] / the reference row's of the same context and budget (when timed)."""
    by_point = {(r["context"], r.get("budget")): r[key] for r in reference}
    out = []
    for row in rows:
        before = by_point.get((row["context"], row.get("budget")))
        out.append(row if before is None else dict(row, **{name: row[key] / before}))
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(report: dict, cfg: BenchConfig) -> Path:
    from jetspec_trt.bench.plots import plot_engine_bench

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    device = report["device"].replace("NVIDIA ", "").split()[0].lower()
    stem = f"engine-{cfg.random_target}-{device}{'-' + cfg.tag if cfg.tag else ''}"
    json_path = cfg.output_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot_engine_bench(report, cfg.output_dir / f"{stem}.png")
    return json_path

