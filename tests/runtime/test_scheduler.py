"""The in-flight batching scheduler (runtime/scheduler.py) on the CPU: requests that join and leave between
rounds decode token for token as they do alone through the eager Decoder (greedy and seeded sampling, trees of
different shapes and AR side by side), sampled tokens follow the target's law, EOS and limits end each request
on its own, and KV pages return to the pool as soon as a request ends or is cancelled."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

import jetspec_trt.runtime.host_rounds as host_rounds_module
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.kv_cache import PagePool
from jetspec_trt.runtime.batch_passes import padded_slots
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.cost_model import CHAIN_PRIOR_OFFERED
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.runtime.scheduler import REFRESH_SHARE, Scheduler, SchedulerConfig
from jetspec_trt.tree.accept import SamplingConfig
from tests.helpers import chi_square_p, sequence_law, small_vocab_pair, tiny_pair, tiny_runtime
from tests.runtime.test_cost_model import FLAT, STEEP, synthetic
from tests.tree.test_sampling import wrong_accept


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    return tiny_pair(tmp_path_factory.mktemp("tiny"))


@dataclasses.dataclass
class Job:
    """A request of a test schedule: added before step `at`."""

    prompt: list[int]
    max_new: int
    at: int = 0
    speculative: bool = True
    tree: TreeConfig | None = None
    sampling: SamplingConfig = SamplingConfig()


# Different prompt lengths (1 to 40 tokens: 1 to 3 pages of 16), limits, tree shapes and AR side by side; jobs
# join while others run, and the short ones leave early (their pages go to the later ones, out of order).
JOBS = [
    Job([5, 9, 200, 31, 7], 30, at=0, tree=TreeConfig(16, 4, 5)),
    Job([42], 6, at=0, speculative=False),
    Job(list(range(60, 100)), 25, at=1, tree=TreeConfig(64, 4, 7)),
    Job([3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3], 9, at=3, tree=TreeConfig(4, 2, 3)),
    Job([250, 1, 17, 88, 120, 33, 2], 20, at=3, tree=TreeConfig(1, 4, 7)),  # budget 1: AR steps
]


def alone(decoder: Decoder, job: Job) -> tuple[list[int], object]:
    """The job's tokens and stats when it is the only request (the eager single-request path)."""
    tokens = [t for c in decoder.generate(job.prompt, job.max_new, job.sampling, job.speculative, job.tree) for t in c]
    return tokens, decoder.stats


def run_schedule(scheduler: Scheduler, jobs: list[Job], check=lambda scheduler, step: None):
    """Add each job before its step and step until everything is done: per job index, the tokens streamed and
    the final stats. `check(scheduler, step)` runs after every step."""
    streamed: dict[int, list[int]] = {}
    stats: dict[int, object] = {}
    ids: dict[int, int] = {}
    step = 0
    while step <= max(j.at for j in jobs) or not scheduler.idle:
        for index, job in enumerate(jobs):
            if job.at == step:
                ids[index] = scheduler.add_request(job.prompt, job.max_new, job.sampling, job.speculative, job.tree)
                streamed[index] = []
        job_of = {rid: index for index, rid in ids.items()}
        for out in scheduler.step():
            index = job_of[out.request_id]
            assert index not in stats, "a finished request ran again"
            streamed[index].extend(out.tokens)
            if out.finished:
                stats[index] = out.stats
        check(scheduler, step)
        step += 1
        assert step < 500
    return streamed, stats


class RecordingDecoder(Decoder):
    """Keeps the draft's per-depth logits of every round."""

    def _draft_logits(self, anchor, position, max_depth):
        logits = super()._draft_logits(anchor, position, max_depth)
        self.drafts.append(logits)
        return logits


class RecordingScheduler(Scheduler):
    """Keeps, per request, the per-depth logits its rounds got from the batched draft pass."""

    def _draft_pass(self, sequences):
        logits = super()._draft_pass(sequences)
        for sequence, depth_logits in zip(sequences, logits):
            self.drafts.setdefault(sequence.request_id, []).append(depth_logits.clone())
        return logits


def test_greedy_batched_equals_each_request_alone(pair):
    """(a) Tokens, rounds and acceptances of each request as alone, and the batched draft pass gives each
    sequence the draft logits it gets alone (a random draft head is rarely right, so the acceptances alone would
    hardly notice a wrong draft context)."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    decoder = RecordingDecoder(target, draft, runtime)
    scheduler = RecordingScheduler(target, draft, runtime, SchedulerConfig(num_pages=40, max_batch=3))
    scheduler.drafts = {}
    sizes = []
    streamed, stats = run_schedule(scheduler, JOBS, check=lambda s, _: sizes.append(len(s.running)))
    for index, job in enumerate(JOBS):
        decoder.drafts = []
        reference, ref_stats = alone(decoder, job)
        batched_drafts = scheduler.drafts.get(index, [])  # (request ids are given in job order here)
        assert len(batched_drafts) == len(decoder.drafts) == (ref_stats.rounds if job.speculative and
                                                               job.tree.budget > 1 else 0)
        for alone_logits, batched_logits in zip(decoder.drafts, batched_drafts):
            torch.testing.assert_close(batched_logits, alone_logits, rtol=1e-4, atol=1e-4)
        ar, _ = alone(decoder, dataclasses.replace(job, speculative=False))
        assert reference == ar  # (greedy speculation is lossless: the check below is against both)
        assert streamed[index] == reference, f"job {index}"
        # The same rounds as alone: the same trees, the same acceptances.
        got = stats[index]
        assert (got.rounds, got.drafted_tokens, got.accepted_drafts, got.emitted_per_round, got.finish_reason) == (
            ref_stats.rounds, ref_stats.drafted_tokens, ref_stats.accepted_drafts, ref_stats.emitted_per_round,
            ref_stats.finish_reason), f"job {index}"
        assert got.new_tokens == len(reference) and got.prompt_tokens == len(job.prompt)
    assert max(sizes) == 3 and sizes[-1] == 0  # the batch was full at times (the queue held the rest)
    assert scheduler.target_pool.free_pages == scheduler.draft_pool.free_pages == 40


class OracleScheduler(Scheduler):
    """A random draft head is almost never right; this scheduler still runs its batched draft pass, then puts
    each sequence's true next tokens at rank 0 of its depth logits most of the time (as tests.helpers'
    OracleDecoder does alone), so rounds accept long paths, stop at wrong siblings and cross EOS and limits."""

    def __init__(self, *args, futures: dict[int, list[int]], hit: float = 0.7, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.futures, self.hit = futures, hit
        self.rng = torch.Generator().manual_seed(seed)

    def _draft_pass(self, sequences):
        logits = super()._draft_pass(sequences)
        for sequence, depth_logits in zip(sequences, logits):
            future, position = self.futures[sequence.request_id], sequence.decoder.length
            for d in range(depth_logits.shape[0]):
                if position + 1 + d < len(future) and float(torch.rand(1, generator=self.rng)) < self.hit:
                    depth_logits[d, future[position + 1 + d]] = 1e4
        return logits


ORACLE_SEEDS = 4


# A pass of 1 + 0.05 s per token: trees pay where the draft is likely right, not where it is not.
LINEAR = synthetic({1: 1.0, 101: 6.0}, {1: 0.1, 8: 0.2})


def test_lookup_trees_batched_equal_each_request_alone(pair):
    """Requests whose trees carry context-lookup chains (TreeConfig.lookup, built per sequence on the host) beside
    plain ones: each request's tokens and rounds are its own alone."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    jobs = [dataclasses.replace(JOBS[0], tree=TreeConfig(16, 4, 5, lookup=4)), JOBS[1],
            dataclasses.replace(JOBS[3], tree=TreeConfig(8, 2, 3, lookup=3)), JOBS[2]]
    decoder = Decoder(target, draft, runtime)
    streamed, stats = run_schedule(Scheduler(target, draft, runtime, SchedulerConfig(num_pages=40, max_batch=3)),
                                   jobs)
    for index, job in enumerate(jobs):
        reference, ref_stats = alone(decoder, job)
        assert streamed[index] == reference, f"job {index}"
        assert stats[index].emitted_per_round == ref_stats.emitted_per_round, f"job {index}"


@pytest.mark.parametrize("policy", ["fixed", "cost_model"])
@pytest.mark.parametrize("with_eos", [False, True], ids=["limits", "eos"])
def test_deep_acceptance_eos_and_limits_per_sequence(pair, with_eos, policy):
    """(c) With a draft that is mostly right, rounds emit many tokens; each request still ends exactly at its
    own limit, or at its first EOS (inside a tree's accepted path), with its own finish reason. Under the cost
    model the trees change size from step to step, AR steps (draft skipped or not) among them."""
    target, draft = pair
    base = tiny_runtime(draft, TreeConfig(32, 4, 7))
    ar = Decoder(target, draft, base)
    references = [alone(ar, dataclasses.replace(job, speculative=False))[0] for job in JOBS]
    # EOS: tokens that requests 0, 2 and 3 emit late (any request stops at the first of them it emits).
    eos = (references[0][15], references[2][12], references[3][6]) if with_eos else base.eos_token_ids
    runtime = dataclasses.replace(base, eos_token_ids=eos)
    ar.runtime = runtime
    expected = [alone(ar, dataclasses.replace(job, speculative=False)) for job in JOBS]
    futures = {i: job.prompt + reference + [0] * 64 for i, (job, reference) in enumerate(zip(JOBS, references))}
    deep = cut = 0
    budgets = collections.Counter()
    for seed in range(ORACLE_SEEDS):
        scheduler = OracleScheduler(target, draft, runtime, SchedulerConfig(40, 4, policy),
                                    None if policy == "fixed" else LINEAR, futures=futures, seed=seed)
        streamed, stats = run_schedule(scheduler, JOBS)
        for index, (tokens, ref_stats) in enumerate(expected):
            assert streamed[index] == tokens, f"seed {seed} job {index}"
            assert stats[index].finish_reason == ref_stats.finish_reason
            deep += sum(emitted > 3 for emitted in stats[index].emitted_per_round)
            cut += sum(stats[index].emitted_per_round) + 1 > stats[index].new_tokens  # the last round was cut
        reasons = [stats[i].finish_reason for i in range(len(JOBS))]
        if with_eos:
            stopped = [i for i, reason in enumerate(reasons) if reason == "stop"]
            assert len(stopped) >= 3 and all(streamed[i][-1] in eos for i in stopped)
            assert all(len(streamed[i]) < JOBS[i].max_new for i in stopped)
        else:
            assert reasons == ["length"] * len(JOBS)
        assert scheduler.target_pool.free_pages == scheduler.draft_pool.free_pages == 40
        budgets.update(scheduler.budget_steps)
    print(deep, cut, budgets)
    if policy == "cost_model":
        assert budgets[1] > 0 and len(budgets) >= 3  # AR steps and trees of several sizes
    # Rounds really accepted long paths, and EOS / the limit cut into their accepted paths.
    assert deep >= 3 * ORACLE_SEEDS and cut >= ORACLE_SEEDS


def test_first_token_can_end_a_request_and_max_seq_len_caps_it(pair):
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5), max_seq_len=48)
    decoder = Decoder(target, draft, runtime)
    jobs = [Job([1, 2, 3], 1), Job(list(range(40)), 30), Job([9, 8], 12, speculative=False)]
    scheduler = Scheduler(target, draft, runtime, SchedulerConfig(num_pages=20, max_batch=4))
    streamed, stats = run_schedule(scheduler, jobs)
    for index, job in enumerate(jobs):
        assert streamed[index] == alone(decoder, job)[0]
    assert len(streamed[0]) == 1 and stats[0].rounds == 0 and stats[0].finish_reason == "length"
    assert len(streamed[1]) == 48 - 40 and stats[1].finish_reason == "length"  # capped by max_seq_len


def test_sampling_with_seeds_equals_each_request_alone(pair):
    """(b) Each sequence draws from its own generator, in the order it draws alone: same seed, same tokens."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    decoder = Decoder(target, draft, runtime)
    samplings = [SamplingConfig(1.0, 1.0, seed=11), SamplingConfig(0.7, 0.9, seed=12),
                 SamplingConfig(1.0, 1.0, seed=13, top_k=5), SamplingConfig(0.0), SamplingConfig(1.0, seed=15)]
    jobs = [dataclasses.replace(job, sampling=s) for job, s in zip(JOBS, samplings)]
    first, _ = run_schedule(Scheduler(target, draft, runtime, SchedulerConfig(40, 3)), jobs)
    again, _ = run_schedule(Scheduler(target, draft, runtime, SchedulerConfig(40, 5)), jobs)  # other batches
    for index, job in enumerate(jobs):
        assert first[index] == again[index] == alone(decoder, job)[0], f"job {index}"
    other = dataclasses.replace(jobs[0], sampling=SamplingConfig(1.0, 1.0, seed=99))
    assert run_schedule(Scheduler(target, draft, runtime, SchedulerConfig(40, 3)), [other])[0][0] != first[0]


NEW_TOKENS, RUNS, PROMPT = 3, 1500, [0, 1, 2]


def batched_p_value(pair, sampling, costs=None):
    """RUNS seeded requests through the scheduler, 32 at a time (with `costs`, under the cost_model policy): the
    chi-square p-value of their first NEW_TOKENS tokens against the target's exact law, the drafts they
    accepted, and the steps per chosen budget."""
    target, draft, runtime = pair
    config = SchedulerConfig(128, 32, "fixed" if costs is None else "cost_model")
    scheduler = Scheduler(target, draft, runtime, config, costs)
    ids = [scheduler.add_request(PROMPT, NEW_TOKENS, dataclasses.replace(sampling, seed=seed)) for seed in range(RUNS)]
    tokens = {i: [] for i in ids}
    accepted = 0
    while not scheduler.idle:
        for out in scheduler.step():
            tokens[out.request_id].extend(out.tokens)
            accepted += out.stats.accepted_drafts if out.finished else 0
    law = sequence_law(target, PROMPT, NEW_TOKENS, sampling)
    return chi_square_p([tuple(t) for t in tokens.values()], law), accepted, scheduler.budget_steps


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    return small_vocab_pair(tmp_path_factory.mktemp("small-vocab"))


def test_batched_sampling_follows_the_target(small_vocab):
    p_value, accepted, _ = batched_p_value(small_vocab, SamplingConfig(0.7, 0.9))
    assert accepted > 0 and p_value > 1e-3


def test_chi_square_catches_a_wrong_rule_on_the_batched_path(small_vocab, monkeypatch):
    monkeypatch.setattr(host_rounds_module, "accept", wrong_accept)  # the rule every sequence's rounds use
    p_value, accepted, _ = batched_p_value(small_vocab, SamplingConfig(1.0, 1.0))
    assert accepted > 0 and p_value < 1e-3


def test_cancel_frees_pages_at_once(pair):
    """(d) Cancelling a running request returns its pages before the next step; a waiting one just leaves the
    queue; the others decode on unchanged, and the pools are full again when all are done."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    decoder = Decoder(target, draft, runtime)
    scheduler = Scheduler(target, draft, runtime, SchedulerConfig(num_pages=40, max_batch=2))
    assert scheduler.target_pool.free_pages == 40
    ids = [scheduler.add_request(job.prompt, job.max_new, job.sampling, job.speculative, job.tree)
           for job in JOBS[:4]]
    streamed = {i: [] for i in ids}
    for out in scheduler.step():
        streamed[out.request_id].extend(out.tokens)
    assert list(scheduler.running) == ids[:2]
    used = 40 - scheduler.target_pool.free_pages
    cancelled = scheduler.running[ids[0]]
    pages = len(cancelled.decoder.target_cache.block_table)
    assert scheduler.cancel(ids[0])
    assert scheduler.target_pool.free_pages == 40 - used + pages  # at once, not at the next step
    assert scheduler.draft_pool.free_pages == 40  # job 1 is AR: it holds no draft pages
    assert scheduler.cancel(ids[3]) and ids[3] not in [s.request_id for s in scheduler.waiting]
    assert cancelled.stats.finish_reason == "cancelled"
    assert not scheduler.cancel(ids[0]) and not scheduler.cancel(12345)
    while not scheduler.idle:
        for out in scheduler.step():
            assert out.request_id not in (ids[0], ids[3])
            streamed[out.request_id].extend(out.tokens)
    for rid, job in zip(ids[1:3], JOBS[1:3]):
        assert streamed[rid] == alone(decoder, job)[0]
    assert scheduler.target_pool.free_pages == scheduler.draft_pool.free_pages == 40


@pytest.mark.parametrize("change,message", [
    (dict(prompt=[]), "^empty prompt$"),
    (dict(prompt=[1] * 256), "max_seq_len is 256"),
    (dict(prompt=[1, 100000]), r"prompt token ids must be in \[0, \d+\)$"),
    (dict(max_new=0), "max_new_tokens must be >= 1"),
    (dict(prompt=[1] * 200, max_new=50), "request needs 17 KV pages; the pool has 12"),
    (dict(tree=TreeConfig(16, 4, 9)), "max_depth must be in 1..7"),
    (dict(tree=TreeConfig(16, 4, 5, lookup=6)), r"lookup must be in 0..5 \(at most max_depth and budget - 1"),
])
def test_bad_requests_are_refused_without_disturbing_running_ones(pair, change, message):
    """(e) A bad request raises JetSpecError with a one-line message when added; the running ones go on."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    decoder = Decoder(target, draft, runtime)
    scheduler = Scheduler(target, draft, runtime, SchedulerConfig(num_pages=12, max_batch=4))
    good = [scheduler.add_request(job.prompt, job.max_new, job.sampling, job.speculative, job.tree)
            for job in JOBS[:2]]
    streamed = {i: [] for i in good}
    for out in scheduler.step():
        streamed[out.request_id].extend(out.tokens)
    bad = dataclasses.replace(JOBS[0], **change)
    with pytest.raises(JetSpecError, match=message) as error:
        scheduler.add_request(bad.prompt, bad.max_new, bad.sampling, bad.speculative, bad.tree)
    assert "\n" not in str(error.value)
    assert list(scheduler.running) == good and not scheduler.waiting
    while not scheduler.idle:
        for out in scheduler.step():
            streamed[out.request_id].extend(out.tokens)
    for rid, job in zip(good, JOBS[:2]):
        assert streamed[rid] == alone(decoder, job)[0]


def test_speculation_needs_a_draft_head(pair):
    target, draft = pair
    runtime = tiny_runtime(draft)
    scheduler = Scheduler(target, None, runtime, SchedulerConfig(num_pages=12))
    with pytest.raises(JetSpecError, match="needs a draft head"):
        scheduler.add_request([1, 2], 4)
    rid = scheduler.add_request([1, 2], 4, speculative=False)
    assert [t for out in scheduler.step() for t in out.tokens] and rid in scheduler.running


def test_a_request_waits_for_pages_first_come_first_served(pair):
    """A request whose pages are not free waits at the head of the queue, and the ones behind it wait too (no
    overtaking, so a long request is never starved by short ones); it is admitted once a request leaves."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    decoder = Decoder(target, draft, runtime)
    jobs = [dataclasses.replace(job, at=0) for job in (JOBS[0], JOBS[2], JOBS[1])]  # 4, 9 and 1 pages of 16
    scheduler = Scheduler(target, draft, runtime, SchedulerConfig(num_pages=10, max_batch=4))
    waits = []
    streamed, _ = run_schedule(scheduler, jobs, check=lambda s, step: waits.append(
        ([r for r in s.running], [w.request_id for w in s.waiting])))
    assert waits[0] == ([0], [1, 2])  # job 2 would fit in the 6 free pages, but job 1 (9 pages) is first
    assert ([1, 2], []) in waits
    for index, job in enumerate(jobs):
        assert streamed[index] == alone(decoder, job)[0]
    assert scheduler.target_pool.free_pages == 10


def test_logprobs_per_request(pair):
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    decoder = Decoder(target, draft, runtime)
    scheduler = Scheduler(target, draft, runtime, SchedulerConfig(num_pages=40, max_batch=4))
    samplings = [SamplingConfig(), SamplingConfig(0.8, 0.95, seed=5)]
    ids = [scheduler.add_request(job.prompt, job.max_new, s, job.speculative, job.tree, logprobs=True)
           for job, s in zip(JOBS[:2], samplings)]
    stats = {}
    while not scheduler.idle:
        stats.update({out.request_id: out.stats for out in scheduler.step() if out.finished})
    for rid, job, sampling in zip(ids, JOBS, samplings):
        tokens = [t for c in decoder.generate(job.prompt, job.max_new, sampling, job.speculative, job.tree,
                                              logprobs=True) for t in c]
        assert len(stats[rid].token_logprobs) == len(tokens) == stats[rid].new_tokens
        torch.testing.assert_close(stats[rid].token_logprobs, decoder.stats.token_logprobs, rtol=1e-4, atol=1e-4)


def test_scattered_pages_decode_as_a_cache_of_their_own(pair):
    """PagePool hands out free pages in the order they came back, so a sequence's pages are soon scattered and
    out of order; reads, writes and the commit's moves all go through its block table."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    pools = [PagePool(model.new_cache(10 * 16, 16)) for model in (target, draft)]
    caches = []
    for pool in pools:
        first, _ = pool.allocate(3 * 16), pool.allocate(2 * 16)
        pool.release(first)
        pool.release(first)  # a second release gives nothing back twice
        assert pool.free_pages == 8 and pool.allocate(11 * 16) is None and pool.free_pages == 8
        pool.allocate(4 * 16)
        caches.append(pool.allocate(4 * 16))
        assert caches[-1].block_table.tolist() == [9, 0, 1, 2] and caches[-1].capacity == 64
    job = Job(list(range(30, 40)), 30, tree=TreeConfig(16, 4, 5))  # 10 + 30 + one tree of 16 <= 64 slots
    assert (alone(Decoder(target, draft, runtime, tuple(caches)), job)[0]
            == alone(Decoder(target, draft, runtime), job)[0])


# -- the cost_model budget policy ----------------------------------------------------------------------------------


class PositionRecordingDecoder(Decoder):
    """Keeps the draft's per-depth logits by the anchor's position."""

    def _draft_logits(self, anchor, position, max_depth):
        logits = super()._draft_logits(anchor, position, max_depth)
        self.drafts[position] = logits
        return logits


class PassCountingScheduler(Scheduler):
    """Counts its draft passes and keeps, per request, the draft logits by the anchor's position."""

    def _draft_pass(self, sequences):
        logits = super()._draft_pass(sequences)
        self.passes += bool(sequences)
        for sequence, depth_logits in zip(sequences, logits):
            self.drafts.setdefault(sequence.request_id, {})[sequence.decoder.length] = depth_logits.clone()
        return logits


def policy_run(pair, costs, jobs=JOBS, max_batch=3):
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    scheduler = PassCountingScheduler(target, draft, runtime, SchedulerConfig(40, max_batch, "cost_model"), costs)
    scheduler.passes, scheduler.drafts, steps = 0, {}, []
    streamed, stats = run_schedule(scheduler, jobs, check=lambda s, step: steps.append(step))
    assert scheduler.target_pool.free_pages == scheduler.draft_pool.free_pages == 40
    return scheduler, streamed, stats, len(steps)


def test_cost_model_policy_steep_costs_step_ar_and_skip_the_draft(pair):
    """Where a pass costs its tokens the policy steps AR and skips the draft pass, drafting again once the
    steps since the last draft have cost the draft pass over REFRESH_SHARE; greedy tokens stay each request's
    own alone. The draft cache of a sequence that skipped passes still gets every committed token's context: its
    draft logits equal those alone at the same position."""
    target, draft = pair
    scheduler, streamed, stats, steps = policy_run(pair, STEEP)
    assert set(scheduler.budget_steps) == {1}
    # Skipped mostly: each new request drafts, and a refresh comes after >= 7 steps here (2 drafting sequences
    # and an AR one: 0.05 x 3 s per step against a 1 s draft pass).
    assert REFRESH_SHARE == 0.05 and 3 <= scheduler.passes <= 4 + steps / 7
    decoder = PositionRecordingDecoder(target, draft, scheduler.runtime)
    redrafted = 0
    for index, job in enumerate(JOBS):
        decoder.drafts = {}
        assert streamed[index] == alone(decoder, job)[0], f"job {index}"
        assert stats[index].drafted_tokens == 0 and stats[index].rounds == len(streamed[index]) - 1
        for position, logits in scheduler.drafts.get(index, {}).items():
            torch.testing.assert_close(logits, decoder.drafts[position], rtol=1e-4, atol=1e-4)
            redrafted += position > min(scheduler.drafts[index])
    assert redrafted >= 2  # drafts after skipped steps were checked


def test_cost_model_policy_flat_costs_verify_each_request_own_tree(pair):
    """Where a pass costs the same for any tokens and drafting is free, every round verifies the request's own
    tree: the rounds of the fixed policy, greedy and seeded sampling alike."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    samplings = [SamplingConfig(1.0, 1.0, seed=11), SamplingConfig(), SamplingConfig(0.7, 0.9, seed=12),
                 SamplingConfig(1.0, 1.0, seed=13, top_k=5), SamplingConfig(1.0, seed=15)]
    for jobs in (JOBS, [dataclasses.replace(job, sampling=s) for job, s in zip(JOBS, samplings)]):
        scheduler, streamed, stats, _ = policy_run(pair, FLAT, jobs)
        fixed, fixed_stats = run_schedule(Scheduler(target, draft, runtime, SchedulerConfig(40, 3)), jobs)
        assert 1 not in scheduler.budget_steps
        for index, job in enumerate(jobs):
            assert streamed[index] == fixed[index] == alone(Decoder(target, draft, runtime), job)[0], f"job {index}"
            got, ref = stats[index], fixed_stats[index]
            assert (got.rounds, got.drafted_tokens, got.accepted_drafts) == (
                ref.rounds, ref.drafted_tokens, ref.accepted_drafts)


@pytest.mark.parametrize("costs", [FLAT, LINEAR], ids=["flat", "linear"])
def test_cost_model_policy_keeps_lookup_chains(pair, costs):
    """Lookup trees under the cost model: a budget below a request's own keeps the chain's first tokens
    (cost_model.cut_tree), the chooser measures what the chain's own nodes bring, and greedy tokens stay each
    request's own alone. With flat costs every round is the request's own tree, chain included."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    jobs = [dataclasses.replace(job, tree=TreeConfig(16, 4, 5, lookup=4)) for job in JOBS[:2]]
    jobs.append(Job([7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8], 24, at=1, tree=TreeConfig(16, 4, 5, lookup=5)))
    scheduler, streamed, stats, _ = policy_run(pair, costs, jobs)
    fixed, fixed_stats = run_schedule(Scheduler(target, draft, runtime, SchedulerConfig(40, 3)), jobs)
    for index, job in enumerate(jobs):
        assert streamed[index] == fixed[index] == alone(Decoder(target, draft, runtime), job)[0], f"job {index}"
        if costs is FLAT:
            assert stats[index].emitted_per_round == fixed_stats[index].emitted_per_round, f"job {index}"
    if costs is LINEAR:  # only budgets below the requests' own ran: the chains measured below were cut ones
        assert max(scheduler.budget_steps) < 16
    assert scheduler.chooser.chain_offered > CHAIN_PRIOR_OFFERED  # chains were verified and measured


@pytest.mark.parametrize("costs", [STEEP, LINEAR], ids=["steep", "linear"])
def test_cost_model_policy_seeded_sampling_equals_each_request_alone(pair, costs):
    """Sampling draws one token from the target per emitted token (tree.accept): whatever trees the policy
    picks, a seeded request's tokens are its own alone (FLAT: see the test above)."""
    target, draft = pair
    samplings = [SamplingConfig(1.0, 1.0, seed=21), SamplingConfig(0.7, 0.9, seed=22), SamplingConfig(1.0, seed=23),
                 SamplingConfig(1.0, 1.0, seed=24, top_k=5)]
    jobs = [dataclasses.replace(job, sampling=s) for job, s in zip(JOBS, samplings)]
    scheduler, streamed, _, _ = policy_run(pair, costs, jobs)
    decoder = Decoder(target, draft, scheduler.runtime)
    for index, job in enumerate(jobs):
        assert streamed[index] == alone(decoder, job)[0], f"job {index}"


# Small-vocabulary drafts are often right: a gently rising pass cost picks trees of several sizes.
GENTLE = synthetic({1: 1.0, 512: 1.5}, {1: 0.1, 32: 0.3})


def test_batched_sampling_follows_the_target_under_the_cost_model(small_vocab):
    """Trees cut to the step's budget: still the target's law."""
    p_value, accepted, budgets = batched_p_value(small_vocab, SamplingConfig(0.7, 0.9), GENTLE)
    assert accepted > 0 and p_value > 1e-3 and len(budgets) >= 3, budgets


def test_cost_model_policy_configuration(pair):
    target, draft = pair
    runtime = tiny_runtime(draft)
    with pytest.raises(JetSpecError, match="budget_policy 'cost_model' needs a cost model"):
        Scheduler(target, draft, runtime, SchedulerConfig(12, 2, "cost_model"))
    with pytest.raises(JetSpecError, match="budget_policy must be one of fixed, cost_model, got 'auto'"):
        Scheduler(target, draft, runtime, SchedulerConfig(12, 2, "auto"), STEEP)


@pytest.mark.parametrize("padded", [False, True], ids=["eager", "padded"])
def test_one_kv_write_and_one_attention_call_per_layer_for_the_whole_batch(pair, monkeypatch, padded):
    """A step's passes launch the KV write and the attention once per layer whatever the batch size (the
    per-sequence loop launched them once per layer and sequence), at the step's shapes or padded."""
    import jetspec_trt.runtime.batch_passes as passes_module

    calls = collections.Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(passes_module, name, wrapper)

    counted("write_kv", passes_module.write_kv)
    counted("tree_attention_batched", passes_module.tree_attention_batched)
    target, draft = pair
    scheduler = Scheduler(target, draft, tiny_runtime(draft, TreeConfig(16, 4, 5)),
                          SchedulerConfig(40, 3, graph_passes=padded))
    for job in JOBS[:3]:
        scheduler.add_request(job.prompt, job.max_new, job.sampling, job.speculative, job.tree)
    scheduler._admit({})  # prefills, one request at a time, outside the batched passes
    assert len(scheduler.running) == 3
    calls.clear()
    scheduler.step()
    # One draft pass (two sequences speculate) and one target pass over all three. (The draft's context extension,
    # whole prompts here, writes through its caches' own write.)
    layers = len(target.layers) + len(draft.layers)
    assert calls == {"write_kv": layers, "tree_attention_batched": layers}


# -- the padded passes (SchedulerConfig.graph_passes: CUDA graphs on CUDA, the same fixed shapes eagerly here) ------


def compare_passes(pair, policy: str) -> tuple[list[tuple[int, int]], Scheduler]:
    """JOBS greedy and seeded-sampled through a scheduler of eager passes and one of padded passes (graphed on
    CUDA): every request gets the same tokens, rounds and acceptances. Returns the padded target passes'
    (sequences, nodes) and the last padded scheduler."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    samplings = [SamplingConfig(1.0, 1.0, seed=31), SamplingConfig(), SamplingConfig(0.7, 0.9, seed=32),
                 SamplingConfig(1.0, 1.0, seed=33, top_k=5), SamplingConfig(1.0, seed=34)]
    costs = None if policy == "fixed" else LINEAR
    shapes = []
    for jobs in (JOBS, [dataclasses.replace(job, sampling=s) for job, s in zip(JOBS, samplings)]):
        runs = {}
        for padded in (False, True):
            scheduler = Scheduler(target, draft, runtime, SchedulerConfig(40, 4, policy, padded), costs)
            if padded:  # record each target pass's sequences and nodes
                verify = scheduler.padded.verify
                scheduler.padded.verify = lambda caches, tokens, *rest: (
                    shapes.append((len(caches), tokens.numel())) or verify(caches, tokens, *rest))
            runs[padded] = run_schedule(scheduler, jobs)
            assert scheduler.target_pool.free_pages == scheduler.draft_pool.free_pages == 40
        (eager, eager_stats), (padded, padded_stats) = runs[False], runs[True]
        for index in range(len(jobs)):
            assert padded[index] == eager[index], f"job {index}"
            got, ref = padded_stats[index], eager_stats[index]
            assert (got.rounds, got.drafted_tokens, got.accepted_drafts, got.finish_reason) == (
                ref.rounds, ref.drafted_tokens, ref.accepted_drafts, ref.finish_reason), f"job {index}"
    return shapes, scheduler


@pytest.mark.parametrize("policy", ["fixed", "cost_model"])
def test_padded_passes_emit_the_tokens_of_the_eager_passes(pair, policy):
    """Sequences padded to a batch bucket and nodes to a token bucket, padding rows in a scratch page: the
    tokens of the eager passes, with requests joining and leaving, trees of several budgets and AR side by side
    (under the cost model: per-step budgets, AR steps and skipped drafts, whose context extensions come in larger
    buckets)."""
    shapes, _ = compare_passes(pair, policy)
    # Padded for real: 3 sequences in the bucket of 4, node counts between powers of two.
    assert any(seqs == 3 for seqs, _ in shapes) and any(nodes & (nodes - 1) for _, nodes in shapes)


def pool_rows(pool):
    """Every slot's K/V row of every layer of the pool: [slots, layers * 2 * Hkv * D]."""
    store = pool.store
    return torch.cat([t.transpose(0, 1).flatten(0, 1).flatten(1) for t in (store.k_all, store.v_all)], 1)


def test_padding_rows_write_only_the_scratch_page(pair):
    """Each padded pass changes the K/V of its real rows' slots and the scratch page's, nothing else: no
    sequence's committed context, no other sequence's slots, no free page."""
    target, draft = pair
    runtime = tiny_runtime(draft, TreeConfig(16, 4, 5))
    scheduler = Scheduler(target, draft, runtime, SchedulerConfig(40, 4, graph_passes=True))
    for job in (JOBS[0], JOBS[2], JOBS[3]):  # 3 sequences: the bucket of 4 has an unused slot and padding rows
        scheduler.add_request(job.prompt, job.max_new, job.sampling, job.speculative, job.tree)
    scheduler.step()  # admission and a first round, whose context extension (whole prompts) runs eagerly
    sequences = list(scheduler.running.values())
    assert len(sequences) == 3
    page, block = runtime.page_size, runtime.block_size

    def written(pool, run):
        """Run, and return the flat slots whose K/V changed in some layer (the pool filled with noise first)."""
        rows = [pool.store.k_all, pool.store.v_all]
        for t in rows:
            t.normal_()
        before = [t.clone() for t in rows]
        with torch.inference_mode():  # (as in Scheduler.step)
            run()
        diff = sum((t != b).flatten(3).any(-1).any(0).flatten().long() for t, b in zip(rows, before))
        slots = set(torch.nonzero(diff).flatten().tolist())
        return slots - scratch(pool), slots & scratch(pool)

    def scratch(pool):
        index = scheduler.padded.target_scratch if pool is scheduler.target_pool else scheduler.padded.draft_scratch
        return set(range(index * page, (index + 1) * page))

    def after_context(caches, counts):
        return set(padded_slots(caches, counts, sum(counts), 0, page).tolist())

    # The draft pass: each sequence's pending context rows, then its block, after its context.
    caches = [s.decoder.draft_cache for s in sequences]
    expected = after_context(caches, [s.decoder._pending[0].shape[0] + block for s in sequences])
    logits = []
    real, padding = written(scheduler.draft_pool, lambda: logits.extend(scheduler._draft_pass(sequences)))
    assert real == expected and padding
    # The target pass over the three trees (84 nodes in a bucket of 128).
    inputs = [s.decoder.tree_inputs(s.decoder.draft_tree(depth_logits)) for s, depth_logits in zip(sequences, logits)]
    counts = [i.tokens.numel() for i in inputs]
    expected = after_context([s.decoder.target_cache for s in sequences], counts)
    real, padding = written(scheduler.target_pool, lambda: scheduler._verify_pass(sequences, inputs, capture=True))
    assert real == expected and padding and (4, 128) in scheduler.padded._verify
