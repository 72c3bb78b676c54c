"""`jetspec-trt bench`: engine speed benchmark (JSON + PNG under bench/results/).

The command lives outside jetspec_trt/bench/ and imports that package only inside its body, when the benchmark
runs: the CLI registers it without loading any bench code (the benchmarks sit above everything they measure).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from jetspec_trt.errors import JetSpecError
from jetspec_trt.runtime.config import DEFAULT_TREE


def _numbers(text: str, kind: type) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise JetSpecError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    return _numbers(text, int)


def _floats(text: str) -> tuple[float, ...]:
    return _numbers(text, float)


@click.command("bench")
@click.option("--random-target", default="qwen3-8b", show_default=True,
              help="Preset shape measured with random weights made on the GPU (speed does not depend on values).")
@click.option("--budgets", default="16,32,64,128,256", show_default=True)
@click.option("--contexts", default="512,2048,8192", show_default=True)
@click.option("--topk", type=int, default=None,
              help=f"Tree width [default: the engine's with --engine, else {DEFAULT_TREE.topk}].")
@click.option("--max-depth", type=int, default=None,
              help=f"Tree depth [default: the engine's with --engine, else {DEFAULT_TREE.max_depth}].")
@click.option("--taus", default="10.76,5.94", show_default=True, help="Accepted lengths to project tok/s for.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16"]), default="bfloat16", show_default=True)
@click.option("--reps", type=int, default=30, show_default=True)
@click.option("--no-hf", is_flag=True, help="Skip Hugging Face transformers generate.")
@click.option("--hf-prompts", type=int, default=None,
              help="Suite bench: HF generate on the first N prompts of each suite only (ratios use those prompts).")
@click.option("--compile/--no-compile", "compile_layers", default=True, show_default=True,
              help="torch.compile the decoder layers inside the CUDA graphs.")
@click.option("--max-seq-len", type=int, default=None,
              help="Engine bench: tokens the engine allows (its KV caches) [default: the largest context + 192]. "
                   "E.g. --contexts 512 --max-seq-len 32768 times context 512 in an engine built for 32 K.")
@click.option("--fused-layer-kernels/--no-fused-layer-kernels", "compare_fused", default=True, show_default=True,
              help="Engine bench: also time the AR step with the fused layer kernels (ar_step_fused_layer_kernels).")
@click.option("--comparisons/--no-comparisons", default=True, show_default=True,
              help="Engine bench: also time each engine switch flipped alone (the GEMV step, the tree kernels, the "
                   "small-M GEMMs, the fused layer kernels) and the sampled rounds; off: the bench's baseline and "
                   "the engines' defaults only (a shorter run).")
@click.option("--profile", "kernel_profile", is_flag=True,
              help="Engine bench: also profile the AR step and each round stage kernel by kernel (torch.profiler) "
                   "under the engines' default switches, with and without the fused layer kernels, and with the "
                   "accept stage switched (fused_accept).")
@click.option("--profile-draft-vocab", "draft_vocab", type=int, default=0, show_default=True,
              help="--profile: also profile the rounds with the draft proposing from this many tokens (build "
                   "--draft-vocab); 0: not.")
@click.option("--fp8/--no-fp8", "compare_fp8", default=False, show_default=True,
              help="Engine bench: then convert the same random target to FP8 (as build --quantize fp8 stores it) "
                   "and time its AR step, rounds and AR breakdown beside bf16 (*_fp8 keys). Needs an sm89+ GPU.")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("bench/results"), show_default=True)
@click.option("--tag", default="", help="Suffix for the output file names.")
@click.option("--engine", "engine_dir", type=click.Path(path_type=Path), default=None,
              help="Real engine: run the suite bench (tau, tok/s vs AR and HF generate) instead of the random one.")
@click.option("--suite", "suites", default="mtbench,math500,humaneval", show_default=True)
@click.option("--prompts-file", type=click.Path(path_type=Path), default=None,
              help='jsonl of {"suite","id","messages"} lines (no dataset packages needed).')
@click.option("--num-prompts", type=int, default=None,
              help="Prompts per suite [default: 10]; --serve-url: requests per pass [default: the largest --clients].")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperatures", default="0,1", show_default=True)
@click.option("--batch", "batches", default=None,
              help="In-flight batching instead, e.g. 1,4,16: that many prompts at once through the engine's "
                   "scheduler per max batch size, speculative (the first of --budgets) and AR, greedy; without "
                   "--engine on --random-target's shape (random weights), speculative tok/s projected at --taus.")
@click.option("--batch-modes", default="spec,spec-auto,ar", show_default=True,
              help="--batch: spec (every round the --budgets tree), spec-auto (each step's budget, at most that, "
                   "from the engine's cost model) and ar (budget 1, the baseline).")
@click.option("--batch-graphs/--no-batch-graphs", "batch_graphs", default=True, show_default=True,
              help="--batch: the scheduler's passes from CUDA graphs per batch and token bucket (off: eager).")
@click.option("--serve-url", default=None,
              help="With --engine (the engine the server serves): the gRPC endpoint (HOST:PORT) of a running "
                   "`jetspec-trt serve`, driven by --clients concurrent streaming clients, greedy; 1 client always "
                   "runs first, as the single-request reference every stream must equal.")
@click.option("--clients", default="1,4,16,64", show_default=True, help="--serve-url: concurrent clients per pass.")
@click.option("--serve-model", default="jetspec", show_default=True, help="--serve-url: the model's name.")
@click.option("--metrics-url", default=None,
              help="--serve-url: the server's metrics endpoint (http://HOST:8002/metrics), for each pass's mean batch.")
@click.option("--pass-timeout", type=float, default=600.0, show_default=True,
              help="--serve-url: seconds a pass may take; requests without a final response by then count as lost.")
@click.option("--device", default="cuda", show_default=True, help="cuda, or cpu (float32, HF generate on CPU too).")
@click.option("--diagnose-fp32", is_flag=True,
              help="Suite bench: also diagnose greedy AR/speculative divergences on a float32 copy of the target.")
@click.option("--quantize-compare", "reference_dir", type=click.Path(path_type=Path), default=None,
              help="Quality instead of speed: --engine (e.g. an FP8 engine or checkpoint) against this unquantized "
                   "reference, teacher-forced on held-out text (--num-prompts per --suite, or from --prompts-file, "
                   "which may also be a .txt): top-1 agreement, perplexities, KL (JSON).")
@click.option("--compare-max-tokens", type=int, default=1024, show_default=True,
              help="--quantize-compare: tokens per held-out text.")
@click.option("--simulate-widths", default=None,
              help="With --engine: tree widths (e.g. 4,7,10,16) whose greedy tau per suite and --budgets is simulated "
                   "from the head's teacher-forced candidates over the target's own outputs (no speculative run; "
                   "any device, the CPU too; JSON + PNG). Speed stays the suite bench's.")
@click.option("--lookup", type=int, default=None,
              help="Suite bench: every speculative run's trees keep this many nodes for a context-lookup chain "
                   "(TreeConfig.lookup; capped at budget - 1) [default: the engine's, at most half a budget other "
                   "than the built one].")
@click.option("--simulate-lookups", default="0", show_default=True,
              help="--simulate-widths: also trees with a context-lookup chain of this many nodes beside the draft's "
                   "(tree/lookup.py), e.g. 0,6: each width without and with it.")
def bench_command(random_target, budgets, contexts, topk, max_depth, taus, dtype, reps, no_hf, hf_prompts,
                  compile_layers, max_seq_len, compare_fused, comparisons, kernel_profile, draft_vocab, compare_fp8,
                  output_dir, tag, engine_dir, suites, prompts_file, num_prompts, max_new_tokens, temperatures,
                  batches, batch_modes, batch_graphs, serve_url, clients, serve_model, metrics_url, pass_timeout,
                  device, diagnose_fp32, reference_dir, compare_max_tokens, simulate_widths, simulate_lookups, lookup):
    """Measure AR decoding, the split of a speculative round, projected tok/s and HF generate on the GPU.

    With --engine: tau and wall-clock speed per prompt suite, budget and temperature (JSON + PNG).
    With --engine and --quantize-compare: a quantized target's quality against the unquantized one (JSON).
    With --engine and --serve-url: a running server under concurrent streaming clients (JSON + PNG).
    With --engine and --simulate-widths: simulated greedy tau per suite, tree width and budget (JSON + PNG)."""
    if serve_url is not None:
        if engine_dir is None:
            raise click.UsageError("--serve-url needs --engine (the engine the server serves)")
        from jetspec_trt.bench.serving import ServingBenchConfig, format_summary, run_serving_bench

        vcfg = ServingBenchConfig(engine_dir=engine_dir, url=serve_url, model=serve_model, clients=_ints(clients),
                                  num_prompts=num_prompts, suites=tuple(suites.split(",")), prompts_file=prompts_file,
                                  max_new_tokens=max_new_tokens, pass_timeout_s=pass_timeout,
                                  metrics_url=metrics_url, output_dir=output_dir, tag=tag)
        path = run_serving_bench(vcfg, command=sys.argv)
        result = json.loads(path.read_text())
        click.echo(format_summary(result))
        click.echo(f"wrote {path} and {path.with_suffix('.png')}")
        if result["failures"]:
            raise JetSpecError(f"serving bench: {'; '.join(result['failures'])} (see {path})")
        return
    num_prompts = 10 if num_prompts is None else num_prompts
    if reference_dir is not None:
        if engine_dir is None:
            raise click.UsageError("--quantize-compare needs --engine (the quantized engine or checkpoint)")
        from jetspec_trt.bench.quantize_compare import QuantizeCompareConfig, format_summary, run_quantize_compare

        sources = [str(prompts_file)] if prompts_file else suites.split(",")
        ccfg = QuantizeCompareConfig(quantized=engine_dir, reference=reference_dir, texts=",".join(sources),
                                     num_texts=num_prompts * len(sources), max_tokens=compare_max_tokens,
                                     device=device, dtype="float32" if device == "cpu" else dtype,
                                     output_dir=output_dir, tag=tag)
        path = run_quantize_compare(ccfg, command=sys.argv)
        click.echo(format_summary(json.loads(path.read_text())))
        click.echo(f"wrote {path}")
        return
    if simulate_widths is not None:
        if engine_dir is None:
            raise click.UsageError("--simulate-widths needs --engine")
        from jetspec_trt.bench.acceptance import AcceptanceBenchConfig, format_summary, run_acceptance_bench

        acfg = AcceptanceBenchConfig(engine_dir=engine_dir, suites=tuple(suites.split(",")), num_prompts=num_prompts,
                                     max_new_tokens=max_new_tokens, budgets=_ints(budgets),
                                     widths=_ints(simulate_widths), lookups=_ints(simulate_lookups),
                                     max_depth=max_depth, device=device,
                                     output_dir=output_dir, tag=tag, prompts_file=prompts_file)
        path = run_acceptance_bench(acfg, command=sys.argv)
        click.echo(format_summary(json.loads(path.read_text())))
        click.echo(f"wrote {path} and {path.with_suffix('.png')}")
        return
    if batches is not None and engine_dir is None:  # a preset's shape, random weights: speed measured, tok/s projected
        from jetspec_trt.bench.batch import RandomBatchConfig, format_summary, run_random_batch_bench

        rcfg = RandomBatchConfig(random_target, _ints(batches), _ints(budgets)[0], topk or DEFAULT_TREE.topk,
                                 max_depth or DEFAULT_TREE.max_depth, _floats(taus), max_new_tokens=max_new_tokens,
                                 dtype="float32" if device == "cpu" else dtype, device=device,
                                 graph_passes=batch_graphs, output_dir=output_dir, tag=tag)
        path = run_random_batch_bench(rcfg, command=sys.argv)
        click.echo(format_summary(json.loads(path.read_text())))
        click.echo(f"wrote {path} and {path.with_suffix('.png')}")
        return
    if batches is not None:
        from jetspec_trt.bench.batch import BatchBenchConfig, format_summary, run_batch_bench

        bcfg = BatchBenchConfig(engine_dir=engine_dir, batches=_ints(batches), budget=_ints(budgets)[0],
                                suites=tuple(suites.split(",")), prompts_file=prompts_file,
                                max_new_tokens=max_new_tokens, modes=tuple(batch_modes.split(",")), device=device,
                                graph_passes=batch_graphs, output_dir=output_dir, tag=tag)
        path = run_batch_bench(bcfg, command=sys.argv)
        click.echo(format_summary(json.loads(path.read_text())))
        click.echo(f"wrote {path} and {path.with_suffix('.png')}")
        return
    if engine_dir is not None:
        from jetspec_trt.bench.suites import SuiteBenchConfig, format_summary, run_suite_bench

        scfg = SuiteBenchConfig(engine_dir=engine_dir, suites=tuple(suites.split(",")), num_prompts=num_prompts,
                                max_new_tokens=max_new_tokens, budgets=_ints(budgets),
                                temperatures=_floats(temperatures), device=device, hf_generate=not no_hf,
                                hf_prompts=hf_prompts, output_dir=output_dir, tag=tag, prompts_file=prompts_file,
                                diagnose_fp32=diagnose_fp32, topk=topk, max_depth=max_depth, lookup=lookup)
        path = run_suite_bench(scfg, command=sys.argv)
        click.echo(format_summary(json.loads(path.read_text())))
        click.echo(f"wrote {path} and {path.with_suffix('.png')}")
        return
    from jetspec_trt.bench.engine_bench import BenchConfig, run_bench

    cfg = BenchConfig(random_target=random_target, budgets=_ints(budgets), contexts=_ints(contexts),
                      topk=topk or DEFAULT_TREE.topk, max_depth=max_depth or DEFAULT_TREE.max_depth,
                      taus=_floats(taus), dtype=dtype, reps=reps, hf_generate=not no_hf,
                      compile_layers=compile_layers, max_seq_len=max_seq_len,
                      compare_fused_layer_kernels=compare_fused and comparisons, compare_gemv=comparisons,
                      compare_tree_kernel=comparisons, compare_small_m_gemm=comparisons, compare_sampled=comparisons,
                      compare_gemv_variants=comparisons,
                      kernel_profile=kernel_profile, draft_vocab=draft_vocab,
                      compare_fp8=compare_fp8, output_dir=output_dir,
                      tag=tag)
    path = run_bench(cfg, command=sys.argv)
    click.echo(f"wrote {path} and {path.with_suffix('.png')}")
