"""On CUDA: the scheduler's passes replayed from CUDA graphs per (batch bucket, token bucket) emit the eager
passes' tokens, token for token in fp32 (tiny random pair)."""

import pytest
import torch

import jetspec_trt.runtime.scheduler as scheduler_module
from jetspec_trt.models.presets import random_models
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.graph_decoder import GraphReplay
from jetspec_trt.runtime.scheduler import Scheduler, SchedulerConfig
from tests.helpers import tiny_runtime
from tests.runtime.test_scheduler import JOBS, compare_passes, run_schedule

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_pair():
    target, draft, _ = random_models("tiny", "cuda", torch.float32)
    return target, draft


def replays(scheduler) -> list:
    padded = scheduler.padded
    return [bucket.run for buckets in (padded._verify, padded._blocks, padded._context) for bucket in buckets.values()]


@pytest.mark.parametrize("policy", ["fixed", "cost_model"])
def test_graphed_passes_emit_the_tokens_of_the_eager_passes(cuda_pair, policy):
    """Greedy and seeded sampling, requests joining and leaving, mixed budgets and AR (CPU twin:
    test_scheduler.py::test_padded_passes_emit_the_tokens_of_the_eager_passes)."""
    shapes, scheduler = compare_passes(cuda_pair, policy)
    assert scheduler.padded.graphs and replays(scheduler)
    assert all(isinstance(run, GraphReplay) for run in replays(scheduler))
    assert any(seqs == 3 for seqs, _ in shapes)


def test_graphs_replay_what_the_same_padded_passes_compute_eagerly(cuda_pair, monkeypatch):
    """The same fixed shapes with and without graphs: the same tokens (the graphs capture the padded passes
    faithfully: static inputs copied in, nothing read from the capture's batch); `prepare_passes` captures
    every bucket the run then uses."""
    target, draft = cuda_pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    graphed = Scheduler(target, draft, runtime, SchedulerConfig(40, 4, graph_passes=True))
    graphed.prepare_passes(max(job.tree.budget for job in JOBS if job.tree is not None))
    captured = len(replays(graphed))
    monkeypatch.setattr(scheduler_module, "load_gpu_kernels", lambda: False)  # padded, not graphed
    eager = Scheduler(target, draft, runtime, SchedulerConfig(40, 4, graph_passes=True))
    assert graphed.padded.graphs and not eager.padded.graphs
    assert run_schedule(graphed, JOBS)[0] == run_schedule(eager, JOBS)[0]
    assert len(replays(graphed)) == captured  # none captured while stepping
