"""Acceptance bench: greedy tau per suite, tree budget and tree WIDTH of an engine's head, simulated.

The target writes its greedy responses to each suite's prompts (runtime.batch_decode, batched), the head is run
teacher-forced at every response position (train/acceptance.py) and the decode loop's rounds are replayed for
every (width, budget) at once (tree/simulate.py), with or without a context-lookup chain beside the draft's
nodes (tree/lookup.py): exactly the tau greedy speculative decoding gets on those
outputs (tests/tree/test_simulate.py holds it round for round to the real loop in fp32), without a speculative
run per setting. So it answers "which tree" on any device, the CPU included; wall-clock speed is the suite
bench's (`bench --engine`), since what a wider tree costs is measured there, not here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from jetspec_trt.bench.plots import plot_acceptance_bench
from jetspec_trt.bench.suites import engine_report_header, load_suite_prompts, write_report
from jetspec_trt.errors import JetSpecError


@dataclass(frozen=True)
class AcceptanceBenchConfig:
    engine_dir: Path
    suites: tuple[str, ...] = ("mtbench", "math500", "humaneval")
    num_prompts: int = 10
    max_new_tokens: int = 256
    budgets: tuple[int, ...] = (16, 64, 256)
    widths: tuple[int, ...] = (4, 7, 10, 16)
    # Context-lookup chains (tree/lookup.py) of up to this many nodes beside the draft's (0: none), each width
    # with each; reported under "<width>+lookup<n>".
    lookups: tuple[int, ...] = (0,)
    max_depth: int | None = None  # None: the engine's
    device: str = "cuda"
    output_dir: Path = Path("bench/results")
    tag: str = ""
    prompts_file: Path | None = None
    gen_batch: int = 32  # prompts decoded together while the target writes the responses

    def validate(self) -> None:
        if min(self.widths) < 1 or min(self.budgets) < 1 or min(self.lookups) < 0:
            raise JetSpecError(f"tree widths and budgets must be >= 1 and lookup chains >= 0, got {self.widths}, "
                               f"{self.budgets} and {self.lookups}")


def greedy_responses(engine, prompts: list[list[int]], cfg: AcceptanceBenchConfig) -> list[list[int]]:
    """The target's greedy response to each prompt (prompt order), batched over the engine's own target."""
    from jetspec_trt.runtime.batch_decode import BatchDecodeConfig, BatchDecoder

    decoder = BatchDecoder(engine.target, BatchDecodeConfig(
        max_batch=min(cfg.gen_batch, len(prompts)), max_seq_len=max(map(len, prompts)) + cfg.max_new_tokens + 1))
    responses: list[list[int]] = [[] for _ in prompts]
    for index, response, _ in decoder.generate(prompts, cfg.max_new_tokens, engine.runtime.eos_token_ids):
        responses[index] = response
    return responses


def tree_name(width: int, lookup: int) -> str:
    return str(width) if lookup == 0 else f"{width}+lookup{lookup}"


def suite_tau(engine, sequences, cfg: AcceptanceBenchConfig, depth: int) -> dict[str, dict[str, float]]:
    """{tree_name: {budget: tau}} over the sequences' responses (train/acceptance.simulated_tau)."""
    from jetspec_trt.train.acceptance import simulated_tau
    from jetspec_trt.train.features import FeatureStore

    draft = engine.decoder.draft
    store = FeatureStore.build(engine.target, sequences, tuple(draft.spec.target_layer_ids), progress=False,
                               keep_hidden=False, where="device")
    trees = tuple((w, m) for w in cfg.widths for m in cfg.lookups)
    taus = simulated_tau(draft, engine.target, store, list(range(len(sequences))), sequences, cfg.budgets, depth,
                         trees)
    return {tree_name(*tree): tau for tree, tau in zip(trees, taus, strict=True)}


@torch.no_grad()
def run_acceptance_bench(cfg: AcceptanceBenchConfig, command: list[str] | None = None) -> Path:
    from jetspec_trt.runtime.engine import Engine
    from jetspec_trt.train.data import TrainSequence

    cfg.validate()
    prompts = load_suite_prompts(cfg.suites, cfg.num_prompts, cfg.prompts_file)
    engine = Engine.load(cfg.engine_dir, device=cfg.device)
    block = engine.runtime.block_size
    if max(cfg.widths) > engine.target_config.vocab_size:
        raise JetSpecError(f"tree width {max(cfg.widths)} exceeds the vocabulary ({engine.target_config.vocab_size})")
    depth = min(cfg.max_depth or engine.runtime.tree.max_depth, block - 1)
    result = engine_report_header("acceptance", engine, cfg.device, "simulated (tree/simulate.py)", command)
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    result["config"]["max_depth"] = depth
    result["suites"] = {}
    for suite in tqdm(cfg.suites, desc="acceptance", unit="suite"):
        ids = [engine.encode(messages) for _, messages in prompts[suite]]
        sequences = [TrainSequence(p, r) for p, r in zip(ids, greedy_responses(engine, ids, cfg), strict=True)]
        result["suites"][suite] = {"prompts": len(ids), "response_tokens": sum(len(s.response_ids) for s in sequences),
                                   "tau": suite_tau(engine, sequences, cfg, depth)}
    return write_report(result, "acceptance", cfg.output_dir, cfg.tag, plot_acceptance_bench)


def format_summary(result: dict) -> str:
    """One line per suite and width: tau at each budget."""
    lines = [f"simulated greedy tau ({result['device_name']}, {result['dtype']}): width -> tau at budgets "
             f"{', '.join(map(str, result['config']['budgets']))}"]
    for suite, row in result["suites"].items():
        for width, taus in row["tau"].items():
            lines.append(f"  {suite:10s} width {width:>12s}: " + "  ".join(f"{t:.3f}" for t in taus.values()))
    return "\n".join(lines)
