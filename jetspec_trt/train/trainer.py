"""Train a JetSpec draft head against a frozen target: data, loop, resumable checkpoints, output, card.

Output directory:
    config.json, model.safetensors   the head in the published layout (load_draft / `jetspec-trt build` read it)
    training_card.json               data, settings, time, loss curve, acceptance proxy before/after
    checkpoints/step-NNNNNNN.pt      model + optimizer + scheduler + step + RNG, every --save-every steps
    data/responses-<hash>.jsonl      the target's own responses as token ids (re-runs reuse them)
    profile_steps.json               with --profile-steps: where a step's time went (train/profile.py)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from jetspec_trt.devices import device_name
from jetspec_trt.dtypes import dtype_name, parse_dtype
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import load_target, save_draft
from jetspec_trt.models.config import DecoderConfig, load_hf_config
from jetspec_trt.models.draft import DraftHead
from jetspec_trt.models.draft_vocab import TOKEN_COUNTS, read_token_counts, write_token_counts
from jetspec_trt.models.target import TargetModel
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.train.acceptance import simulated_tau
from jetspec_trt.train.data import DataConfig, TrainSequence, generate_responses, generation_stats, split_heldout
from jetspec_trt.train.features import FEATURE_STORES, FeatureStore, to_device
from jetspec_trt.train.head import (choose_mask_token, freeze, init_head_shape, load_head_weights, new_head,
                                    parse_layer_ids, rope_theta, warm_start_from_target)
from jetspec_trt.train.loss import LossConfig, chunked_argmax, depth_weights, head_loss, resolve_backend
from jetspec_trt.train.objective import BlockBatch, block_hidden, depth_valid, sample_anchors
from jetspec_trt.train.profile import PROFILE_FILE, PhaseTimer, StepProfiler

CHECKPOINT_DIR = "checkpoints"
CARD = "training_card.json"
# A time budget plans the step count at these steps, each time from the pace since the step half-way there:
# the first steps carry one-off costs (allocator growth, kernel caches), so an early plan errs short and the
# later one corrects it (on an H200 the pace over steps 10-20 was 1.5x slower than the run's average).
PLAN_AT_STEPS = (20, 200)
# After the last of those, the plan is redone every REPLAN_EVERY steps from the pace since the previous plan, and
# the budget is a hard deadline: a run still short of its plan when the budget is spent stops there and writes its
# head (the cosine then ends above 0). A lease's GPU is shared or its pace drifts: on 2026-12-04 a run planned for
# 660 s at its step-200 pace ran 23+ minutes beside a second training and lost its head when the lease ended.
REPLAN_EVERY = 200
# --wall-budget: kept back for the final held-out evaluation and the writes (~30 s on an H200 on 2026-12-04),
# and the least training a run gets however long its setup took.
WRAP_UP_S = 45.0
MIN_TRAIN_S = 10.0
EVAL_SEED = 12345  # the held-out anchors are the same before and after training, and across runs
BETAS = (0.9, 0.95)
CURVE_DEPTHS = (1, 2, 4, 8, 15)  # depths whose held-out agreement the card's curve follows during training
# Tree budgets whose greedy tau every evaluation simulates on the held-out sequences (train/acceptance.py), at the
# engine's default tree width and depth: the suite bench's budgets.
TAU_BUDGETS = (16, 64, 256)


@dataclass(frozen=True)
class TrainConfig:
    target_dir: Path
    output_dir: Path
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 2000  # 0: prepare the data only
    batch_size: int = 4  # sequences per step
    lr: float = 6e-4
    warmup_steps: int | None = None  # None: 4% of the steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    block_size: int = 16
    num_layers: int = 1
    # The head's MLP width (None: the target's, or the --init-head's); a narrower one than the init head's keeps
    # its strongest neurons. At a 0.5B target a second full-width layer would take the head past ~60 MB.
    intermediate_size: int | None = None
    # The head's KV heads (None: the target's, or the --init-head's); a multiple of the init head's widens it
    # exactly (train/head.py head_decoder_config says why a small target's GQA starves the first layer).
    num_kv_heads: int | None = None
    target_layer_ids: str = "auto"
    mask_token_id: int | None = None  # None: the tokenizer's mask token or a reserved special
    loss: LossConfig = field(default_factory=LossConfig)
    # Draft blocks per sequence and step; 512 covers every response position of most sequences, so one
    # target pass (the feature store) supervises every anchor the data has.
    anchors_per_seq: int = 512
    anchor_group: int = 64  # anchors per attention row (see Trainer.step_rows)
    # Keep depth k's row with probability w_k (the depth weight) and weight kept rows equally: the same expected
    # loss as weighting every row by w_k, at sum(w)/(B-1) of the lm_head + loss work (45% for gamma 7, block 16),
    # which is most of a step. The body still runs every block position (the causal block needs them).
    depth_sampling: bool = True
    heldout: int = 32  # sequences kept out of training for the acceptance proxy
    eval_anchors: int = 64  # anchors per held-out sequence
    eval_every: int = 0  # held-out agreement per depth every this many steps (0: only before and after)
    warm_start: bool = False  # copy the last target layers into the head where shapes agree
    # Start from a trained head (published layout) instead of a random one: continue training it on new data
    # or with a new schedule. Its shape (layers, block size, target layer ids, mask token) is the run's shape.
    init_head: Path | None = None
    device: str = "cpu"
    dtype: str = "auto"  # of the frozen target: bfloat16 on cuda, float32 on cpu; the head trains in fp32
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    max_time_s: float | None = None  # stop (with a checkpoint) after this much training time; resume later
    # Fit the whole schedule (warmup + cosine to 0) into this much training time: at PLAN_AT_STEPS steps and
    # every REPLAN_EVERY after, the run's step count becomes what fits (at most `steps`); once the time is spent
    # the run stops and writes its head. For fixed-size GPU leases.
    time_budget_s: float | None = None
    # The whole command, setup included (data, target load, feature pass, first evaluation), ends within this many
    # seconds: once set up, the training time budget becomes what is left of it, less WRAP_UP_S for the final
    # evaluation and the writes (at most time_budget_s where both are given). A fixed lease counts the setup too:
    # on 2026-12-04 a 346 s feature pass ran before a 330 s schedule that had been planned without it.
    wall_budget_s: float | None = None
    # Target feature pass: sequences packed up to this many tokens per forward (None: 4096 on CUDA, where
    # per-sequence forwards are launch-bound; 0 on CPU, where packing only adds masked-out attention work).
    feature_pack_tokens: int | None = None
    # Where the target's features live: "device", "host" (pinned, gathered per step) or "auto" (the device while
    # they take at most half its free memory: train/features.py).
    feature_store: str = "auto"
    seed: int = 0
    progress: bool = True
    # Trace this many training steps (after train/profile.py's untraced warm-up steps; all of them train as usual)
    # under torch.profiler and write OUTPUT/profile_steps.json: step time, per-phase time, the top kernels.
    profile_steps: int = 0

    def validate(self) -> None:
        checks = [
            (self.steps >= 0, f"--steps must be >= 0, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.anchors_per_seq >= 1, f"--anchors-per-seq must be >= 1, got {self.anchors_per_seq}"),
            (self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}"),
            (self.profile_steps >= 0, f"--profile-steps must be >= 0, got {self.profile_steps}"),
            (self.intermediate_size is None or self.intermediate_size >= 1,
             f"--intermediate-size must be >= 1, got {self.intermediate_size}"),
            (self.num_kv_heads is None or self.num_kv_heads >= 1,
             f"--num-kv-heads must be >= 1, got {self.num_kv_heads}"),
            (self.anchor_group >= 1, f"--anchor-group must be >= 1, got {self.anchor_group}"),
            (self.time_budget_s is None or self.time_budget_s > 0,
             f"--time-budget must be > 0 seconds, got {self.time_budget_s}"),
            (self.wall_budget_s is None or self.wall_budget_s > 0,
             f"--wall-budget must be > 0 seconds, got {self.wall_budget_s}"),
            (self.data.max_new_tokens >= 2, f"--max-new-tokens must be >= 2, got {self.data.max_new_tokens}"),
            (self.data.prompt_offset >= 0, f"--prompt-offset must be >= 0, got {self.data.prompt_offset}"),
            (self.data.gen_temperature >= 0, f"--gen-temperature must be >= 0, got {self.data.gen_temperature}"),
            (self.data.gen_batch_size >= 1, f"--gen-batch-size must be >= 1, got {self.data.gen_batch_size}"),
            (self.feature_store in FEATURE_STORES,
             f"--feature-store must be one of {', '.join(FEATURE_STORES)}, got {self.feature_store!r}"),
            (self.data.gen_prefill_tokens >= 1,
             f"--gen-prefill-tokens must be >= 1, got {self.data.gen_prefill_tokens}"),
            (self.data.gen_time_budget_s is None or self.data.gen_time_budget_s >= 0,
             f"--gen-time-budget must be >= 0 seconds, got {self.data.gen_time_budget_s}"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
            (not (self.init_head and self.warm_start), "--init-head and --warm-start exclude each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise JetSpecError(message)
        self.loss.validate()

    def feature_pack_tokens_on(self, device: str) -> int:
        if self.feature_pack_tokens is not None:
            return self.feature_pack_tokens
        return 4096 if device.startswith("cuda") else 0

    def warmup(self, total_steps: int | None = None) -> int:
        total = self.steps if total_steps is None else total_steps
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.04 * total))


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    finished: bool  # False: stopped by max_time_s (resume with resume=True) or steps == 0
    card: dict


def resolve_device(device: str, dtype: str) -> tuple[str, torch.dtype]:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise JetSpecError(f"--device {device}: CUDA is not available on this machine")
    elif device != "cpu":
        raise JetSpecError(f"--device must be cpu or cuda[:N], got {device!r}")
    if dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, parse_dtype(dtype)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("step-*.pt"))


def save_checkpoint(directory: Path, payload: dict, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{payload['step']:07d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous checkpoint intact
    for old in checkpoint_files(directory)[:-max(1, keep)]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a torn or foreign file
        raise JetSpecError(f"{path}: unreadable checkpoint ({type(err).__name__})") from err


# ------------------------------------------------------------------------------------------------- the trainer


@dataclass
class StepRows:
    """A step's block batch and its supervised rows: every valid (sequence, anchor, depth), in the boolean-mask
    order of `valid` [N, K, B-1]."""

    batch: BlockBatch
    valid: torch.Tensor
    depth: torch.Tensor  # [R] long, 0-based depth of each row
    labels: torch.Tensor  # [R] long, the token each row predicts
    teacher_hidden: torch.Tensor | None  # [R, H] the target's final normed hidden state there (KL loss only)
    hidden_index: torch.Tensor  # [R] long, each row's position in block_hidden's output flattened to [N*K*B, H]


class Trainer:
    def __init__(self, cfg: TrainConfig, target: TargetModel, head: DraftHead, train_seqs: list[TrainSequence],
                 heldout: list[TrainSequence], generator: torch.Generator, device: str):
        self.cfg = cfg
        self.target = target
        self.head = head
        # One store over both: training rows are 0..num_train-1, held-out rows follow.
        self.sequences = train_seqs + heldout
        self.num_train = len(train_seqs)
        self.heldout_rows = list(range(self.num_train, len(self.sequences)))
        self.generator = generator
        self.device = device
        self.capture = head.spec.target_layer_ids
        started = time.perf_counter()
        self.store = FeatureStore.build(target, self.sequences, self.capture, cfg.progress,
                                        cfg.feature_pack_tokens_on(device), keep_hidden=cfg.loss.kind == "kl",
                                        where=cfg.feature_store)
        # Before the first step: in a fixed GPU lease this is time the step plan cannot see (2026-12-04: the
        # stage took ~5 minutes before a 300 s schedule, 9.8 M tokens, unexplained for want of this line).
        self.features_s = time.perf_counter() - started
        self.setup_s = 0.0  # train() sets it: data, target load, features, first evaluation
        tqdm.write(f"target features: {self.store.tokens.numel()} tokens of {len(self.sequences)} sequences in "
                   f"{self.features_s:.1f} s (store on {self.store.features.device})")
        self.autocast = device.startswith("cuda") and target.embed_tokens.weight.dtype != torch.float32
        self.loss_backend = resolve_backend(cfg.loss, device)
        # A host copy for the step's depth sampling (built on the host) and the loss's equal-weights check.
        self.host_depth_weights = depth_weights(head.spec.block_size - 1, cfg.loss.decay_gamma)
        self.depth_weights = self.host_depth_weights.to(device)
        self.unit_weights = torch.ones_like(self.depth_weights)  # the loss's weights under depth sampling
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=BETAS,
                                           weight_decay=cfg.weight_decay)
        self.total_steps = cfg.steps  # lowered by plan_steps() under a time budget
        self.stopped_at_time_budget = False  # the budget ran out before the planned steps (run_loop)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup(self.total_steps), self.total_steps))
        self.step = 0
        self.losses: list[float] = []  # one per step; on a GPU the latest step's arrives a step late (record_loss)
        self._pending_loss: tuple[torch.Tensor, torch.cuda.Event] | None = None
        self.positions = 0  # supervised (anchor, depth) rows so far
        self.curve: list[dict] = []  # held-out agreement during training (eval_every)
        self.order: list[int] = []  # the epoch's shuffled sequence indices, consumed from the front
        self.elapsed_s = 0.0
        self.proxy_before: dict | None = None
        self.resumed_from: list[int] = []
        self.phase_timer: PhaseTimer | None = None  # set while a StepProfiler times the step's phases

    # -- data order and batches

    def next_indices(self) -> list[int]:
        picked = []
        while len(picked) < self.cfg.batch_size:
            if not self.order:
                self.order = torch.randperm(self.num_train, generator=self.generator).tolist()
            picked.append(self.order.pop(0))
        return picked

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    def step_rows(self, rows: list[int], anchors_per_seq: int, generator: torch.Generator,
                  sample_depths: bool = False) -> StepRows:
        """The block batch of sequences `rows` (indices into self.sequences) and, for every valid (anchor,
        depth) in boolean-mask order, its depth, its label (the token the depth predicts) and, for the KL
        loss, the target's final hidden state at the teacher position. With `sample_depths`, each (anchor,
        depth k) row is kept with probability w_k (TrainConfig.depth_sampling)."""
        block, group = self.head.spec.block_size, self.cfg.anchor_group
        picked = [sample_anchors(len(self.sequences[r].prompt_ids), len(self.sequences[r]), anchors_per_seq,
                                 generator) for r in rows]
        # Each group of `group` anchors of a sequence is its own batch row: a block row attends [context; its
        # row's blocks] densely, so the masked-out block keys cost group * block_size per query instead of
        # anchors_per_seq * block_size. The rows of a sequence share its context (BlockBatch.row_sequence).
        split = [(i, a[j : j + group]) for i, a in enumerate(picked) for j in range(0, max(1, len(a)), group)]
        row_sequence, anchors = [i for i, _ in split], [a for _, a in split]
        seq_rows = rows  # the step's sequences (indices into self.sequences), one features row each
        rows = [seq_rows[i] for i in row_sequence]  # each batch row's sequence
        n, k = len(rows), max(1, max(len(a) for a in anchors))
        # Every index is built here on the host, where the lengths and the sampled anchors are, then copied to the
        # device without blocking (features.to_device): a device step then never waits for the device before
        # queueing its forward, as a pageable copy, a read-back or a boolean-mask index on the device would make
        # it. The same values (and the same generator draws) as building them on the device.
        anchor_t = torch.zeros(n, k, dtype=torch.long)
        anchor_valid = torch.zeros(n, k, dtype=torch.bool)
        for row, picks in enumerate(anchors):
            anchor_t[row, : len(picks)] = torch.tensor(picks, dtype=torch.long)
            anchor_valid[row, : len(picks)] = True
        store = self.store
        offsets = store.host_offsets[rows]
        valid = depth_valid(anchor_t, anchor_valid, store.host_lengths[rows], block)
        if sample_depths:
            valid = valid & (torch.rand(valid.shape, generator=generator) < self.host_depth_weights)
        # depth i (1-based) of anchor a: the teacher is the target at position a+i-1, the label the token a+i
        teacher_rows = (offsets[:, None, None] + anchor_t[:, :, None] + torch.arange(block - 1))[valid]
        depth = torch.arange(block - 1).expand(valid.shape)[valid]
        # the supervised rows of block_hidden's [N*K*B, H] output (block position 0 is the anchor's), in valid's order
        hidden_index = torch.cat([valid.new_zeros(n, k, 1), valid], dim=-1).flatten().nonzero().squeeze(1)
        width = max(len(self.sequences[r]) for r in seq_rows)
        device = self.device
        teacher_rows_d = to_device(teacher_rows, device)
        batch = BlockBatch(store.padded_features(seq_rows, width), to_device(store.host_lengths[seq_rows], device),
                           to_device(anchor_t, device), store.tokens[to_device(offsets[:, None] + anchor_t, device)],
                           to_device(anchor_valid, device), to_device(torch.tensor(row_sequence), device))
        teacher = None if store.final_hidden is None else store.final_hidden_rows(teacher_rows)
        return StepRows(batch, to_device(valid, device), to_device(depth, device), store.tokens[teacher_rows_d + 1],
                        teacher, to_device(hidden_index, device))

    def head_hidden(self, rows: StepRows) -> torch.Tensor:
        """[R, H] the head's normed hidden states at every valid (anchor, depth)."""
        hidden = block_hidden(self.head, self.target, rows.batch)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.hidden_index)

    # -- one optimisation step

    @contextlib.contextmanager
    def phase(self, name: str):
        """A named part of train_step: a profiler range (cheap when no profiler runs), timed while profiling."""
        with torch.profiler.record_function(name):
            if self.phase_timer is None:
                yield
            else:
                with self.phase_timer.time(name):
                    yield

    def train_step(self) -> float | None:
        """One optimisation step; returns the latest loss known (record_loss)."""
        sampled = self.cfg.depth_sampling
        with self.phase("rows"):
            rows = self.step_rows(self.next_indices(), self.cfg.anchors_per_seq, self.generator, sampled)
        weights = self.unit_weights if sampled else self.depth_weights
        # (the liger loss asks whether all weights are equal: answered from the host copy, not read back)
        equal_weights = sampled or bool((self.host_depth_weights == self.host_depth_weights[0]).all())
        with self._autocast():
            with self.phase("head_forward"):
                hidden = self.head_hidden(rows)
            with self.phase("loss"):
                loss = head_loss(hidden, self.target.lm_head.weight, rows.depth, weights, rows.labels,
                                 rows.teacher_hidden, self.cfg.loss, self.loss_backend, equal_weights)
        with self.phase("backward"):
            loss.backward()
        with self.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.positions += int(rows.depth.shape[0])
        with self.phase("loss_item"):  # the host waits here for the device (the previous step's work on a GPU)
            return self.record_loss(loss.detach())

    def record_loss(self, loss: torch.Tensor) -> float | None:
        """Append the step's loss to self.losses; returns the latest loss known (None: none yet).

        On a GPU the loss is copied to the host without blocking and read at the end of the next step, once that
        step's work is queued: reading it now would leave the device idle while the host prepares the next step
        (step_rows, launches). On the CPU every op has run already."""
        if not loss.is_cuda:
            self.losses.append(loss.item())
            return self.losses[-1]
        previous = self.flush_losses()
        event = torch.cuda.Event()
        self._pending_loss = (loss.to("cpu", non_blocking=True), event)  # a pinned host tensor
        event.record()
        return previous

    def flush_losses(self) -> float | None:
        """Wait for the pending step's loss (if any) and append it to self.losses; returns it."""
        if self._pending_loss is None:
            return None
        value, event = self._pending_loss
        self._pending_loss = None
        event.synchronize()
        self.losses.append(value.item())
        return self.losses[-1]

    # -- evaluation

    @torch.no_grad()
    def evaluate(self, simulate: bool = False) -> dict:
        """Acceptance proxy on the held-out sequences: per-depth top-1 agreement of the head with the token
        the target wrote there (for greedy responses: the target's argmax, what greedy verification accepts),
        the mean accepted length of a width-1 chain (leading agreements + the bonus token), and the loss."""
        block = self.head.spec.block_size
        was_training = self.head.training
        self.head.eval()
        generator = torch.Generator().manual_seed(EVAL_SEED)
        agree = torch.zeros(block - 1, dtype=torch.float64)
        total = torch.zeros(block - 1, dtype=torch.float64)
        chain, anchors, loss_sum, weight_sum = 0.0, 0, 0.0, 0.0
        lm_weight = self.target.lm_head.weight
        for row in self.heldout_rows:
            rows = self.step_rows([row], self.cfg.eval_anchors, generator)
            valid = rows.valid
            if not bool(valid.any()):
                continue
            with self._autocast():
                hidden = self.head_hidden(rows)
                loss = head_loss(hidden, lm_weight, rows.depth, self.depth_weights, rows.labels,
                                 rows.teacher_hidden, self.cfg.loss)
            weight = float(self.depth_weights[rows.depth].sum())
            loss_sum, weight_sum = loss_sum + float(loss) * weight, weight_sum + weight
            hits = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)
            hits[valid] = chunked_argmax(hidden, lm_weight) == rows.labels
            agree += hits.sum((0, 1)).cpu().double()
            total += valid.sum((0, 1)).cpu().double()
            # leading run of agreements per anchor (a miss or the sequence's end stops it)
            run = (hits & valid).int().cumprod(-1).sum(-1)
            chain += float((run + 1)[rows.batch.anchor_valid].sum())
            anchors += int(rows.batch.anchor_valid.sum())
        tree = TreeConfig()
        tau = None if not simulate else simulated_tau(
            self.head, self.target, self.store, self.heldout_rows, [self.sequences[r] for r in self.heldout_rows],
            TAU_BUDGETS, tree.max_depth, ((tree.topk, 0),), self._autocast)[0]
        self.head.train(was_training)
        per_depth = (agree / total.clamp(min=1)).tolist()
        return {
            "heldout_sequences": len(self.heldout_rows),
            "anchors": anchors,
            "top1_agreement_per_depth": [round(x, 4) for x in per_depth],
            "chain_tau_proxy": round(chain / max(1, anchors), 4),
            # greedy tau of the engine's best-first trees (width tree.topk) per budget, every response position
            # an anchor: the suite bench's number on these sequences (train/acceptance.py); None unless `simulate`
            "simulated_tau": tau,
            "tree": {"topk": tree.topk, "max_depth": tree.max_depth},
            "loss": round(loss_sum / max(weight_sum, 1e-12), 4),
        }

    def record_curve(self, proxy: dict | None = None, simulate: bool = False) -> dict:
        """Append the held-out agreement at CURVE_DEPTHS (of `proxy`, else of a fresh evaluation, with the
        simulated tau if `simulate`: the first and last points) to the training curve; returns the proxy."""
        proxy = self.evaluate(simulate) if proxy is None else proxy
        per_depth = proxy["top1_agreement_per_depth"]
        point = {"step": self.step, "positions": self.positions, "elapsed_s": round(self.elapsed_s, 1),
                 "chain_tau_proxy": proxy["chain_tau_proxy"], "simulated_tau": proxy.get("simulated_tau"),
                 "loss": proxy["loss"],
                 "top1_agreement": {str(d): per_depth[d - 1] for d in CURVE_DEPTHS if d <= len(per_depth)}}
        self.curve.append(point)
        return proxy

    # -- checkpoints

    def payload(self) -> dict:
        self.flush_losses()
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "head": self.head.state_dict(),
            "head_spec": head_identity(self.head),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "order": list(self.order),
            "losses": list(self.losses),
            "positions": self.positions,
            "curve": json.dumps(self.curve),
            "elapsed_s": self.elapsed_s,
            "proxy_before": json.dumps(self.proxy_before),
            "resumed_from": list(self.resumed_from),
        }

    def restore(self, payload: dict, source: Path) -> None:
        if payload.get("head_spec") != head_identity(self.head):
            raise JetSpecError(f"{source}: checkpoint is of a different head ({payload.get('head_spec')}); "
                               "use the same --block-size/--num-layers/--target-layer-ids/--mask-token-id")
        self.head.load_state_dict(payload["head"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.generator.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        self.step = int(payload["step"])
        self.total_steps = int(payload.get("total_steps", self.cfg.steps))
        self.order = list(payload["order"])
        self.losses = list(payload["losses"])
        self.positions = int(payload.get("positions", 0))
        self.curve = json.loads(payload.get("curve", "[]"))
        self.elapsed_s = float(payload["elapsed_s"])
        self.proxy_before = json.loads(payload["proxy_before"])
        self.resumed_from = list(payload["resumed_from"]) + [self.step]


def head_identity(head: DraftHead) -> dict:
    spec = head.spec
    return {"num_layers": len(head.layers), "intermediate_size": head.config.intermediate_size,
            "num_kv_heads": head.config.num_kv_heads, "block_size": spec.block_size,
            "target_layer_ids": list(spec.target_layer_ids), "mask_token_id": spec.mask_token_id}


# ------------------------------------------------------------------------------------------------- entry point


def train(cfg: TrainConfig) -> TrainResult:
    """Prepare data, train (or resume), write the head and its training card. Raises JetSpecError."""
    cfg.validate()
    run_start = time.perf_counter()
    target_dir, out = Path(cfg.target_dir), Path(cfg.output_dir)
    if not target_dir.is_dir():
        raise JetSpecError(f"target directory {target_dir} does not exist")
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    tcfg = DecoderConfig.from_hf(load_hf_config(target_dir))
    if cfg.init_head is not None:  # the run takes the trained head's shape (checked against target and flags)
        shape = init_head_shape(Path(cfg.init_head), target_dir, cfg.num_layers, cfg.block_size,
                                cfg.target_layer_ids, cfg.mask_token_id, cfg.intermediate_size, cfg.num_kv_heads)
        cfg = dataclasses.replace(cfg, num_layers=shape.num_layers, block_size=shape.block_size,
                                  target_layer_ids=",".join(map(str, shape.target_layer_ids)),
                                  mask_token_id=shape.mask_token_id, intermediate_size=shape.intermediate_size,
                                  num_kv_heads=shape.num_kv_heads)
    layer_ids = parse_layer_ids(cfg.target_layer_ids, tcfg.num_layers, cfg.num_layers)
    if cfg.block_size < 2:
        raise JetSpecError(f"--block-size must be >= 2, got {cfg.block_size}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target_dir), local_files_only=True)
    mask_token_id = choose_mask_token(tokenizer, tcfg.vocab_size, cfg.mask_token_id)
    ckpt_dir = out / CHECKPOINT_DIR
    existing = checkpoint_files(ckpt_dir)
    if cfg.resume and not existing:
        raise JetSpecError(f"--resume: no checkpoint in {ckpt_dir}")
    if existing and not cfg.resume and cfg.steps > 0:
        if not cfg.overwrite:
            raise JetSpecError(f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue it "
                               "or --overwrite to start over")
        for old in existing:
            old.unlink()

    gen_start = time.perf_counter()
    sequences, cache_path = generate_responses(target_dir, cfg.data, out, device, dtype, cfg.seed, cfg.progress)
    generation_s = time.perf_counter() - gen_start
    train_seqs, heldout = split_heldout(sequences, cfg.heldout)
    train_counts = response_counts(train_seqs)  # the card's vocabulary coverage, and the head's token counts
    data_card = data_summary(cfg, sequences, train_seqs, heldout, cache_path, mask_token_id, generation_s,
                             train_counts)
    if cfg.steps == 0:
        return TrainResult(out, 0, False, {"data": data_card})

    target = load_target(target_dir, dtype, device)
    freeze(target)
    generator = torch.Generator().manual_seed(cfg.seed)
    head = new_head(target, cfg.num_layers, cfg.block_size, layer_ids, mask_token_id, generator,
                    cfg.intermediate_size, cfg.num_kv_heads)
    copied = warm_start_from_target(head, target) if cfg.warm_start else []
    reshaped = load_head_weights(head, cfg.init_head) if cfg.init_head is not None else []
    head = head.to(device).train()
    trainer = Trainer(cfg, target, head, train_seqs, heldout, generator, device)
    if cfg.resume:
        trainer.restore(load_checkpoint(existing[-1]), existing[-1])
    else:
        trainer.proxy_before = trainer.record_curve(simulate=True)

    trainer.setup_s = time.perf_counter() - run_start  # everything before the first step (the card shows it)
    if cfg.wall_budget_s is not None:
        trainer.cfg = cfg = fit_wall_budget(cfg, trainer.setup_s, trainer.elapsed_s)
    profile = out / PROFILE_FILE if cfg.profile_steps else None
    finished = run_loop(trainer, ckpt_dir, profile)
    card = {"data": data_card}
    if finished:
        card = write_outputs(trainer, out, tokenizer, tcfg, dtype, data_card, copied, reshaped, train_counts)
    return TrainResult(out, trainer.step, finished, card)


def run_loop(trainer: Trainer, ckpt_dir: Path, profile_path: Path | None = None) -> bool:
    """Train until the planned step count; False when max_time_s stopped it first (a checkpoint is written
    either way). With `profile_path`, the first steps are profiled into it (train/profile.py)."""
    cfg = trainer.cfg
    profiler = None
    if profile_path is not None and cfg.profile_steps:
        profiler = StepProfiler(cfg.profile_steps, trainer.device, profile_path, trainer.step)
        trainer.phase_timer = profiler.timer
    bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc="training draft head", unit="step",
               disable=not cfg.progress)
    started = time.perf_counter()
    base = trainer.elapsed_s
    smoothed = None
    marks: dict[int, float] = {}  # step -> elapsed_s, in this process only: a resumed run plans from its own pace
    while trainer.step < trainer.total_steps:
        if profiler is not None:
            profiler.begin()
        loss = trainer.train_step()  # None while no step's loss has reached the host yet
        if profiler is not None:
            profiler.end()
            if profiler.done:
                profiler, trainer.phase_timer = None, None
        if loss is not None:
            smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
        trainer.elapsed_s = base + time.perf_counter() - started
        if cfg.time_budget_s is not None:
            plan_from = plan_window_start(trainer.step)
            if trainer.elapsed_s >= cfg.time_budget_s and trainer.step < trainer.total_steps:
                trainer.total_steps = trainer.step
                trainer.stopped_at_time_budget = True
            elif plan_from in marks and trainer.step < trainer.total_steps:
                pace = (trainer.elapsed_s - marks[plan_from]) / (trainer.step - plan_from)
                trainer.total_steps = planned_steps(cfg, trainer.step, trainer.elapsed_s, pace)
            marks[trainer.step] = trainer.elapsed_s
            bar.total = trainer.total_steps
        bar.update(1)
        bar.set_postfix(loss=f"{smoothed if smoothed is not None else float('nan'):.4f}",
                        lr=f"{trainer.scheduler.get_last_lr()[0]:.2e}")
        if cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < trainer.total_steps:
            trainer.record_curve()
            point = trainer.curve[-1]
            tqdm.write(f"step {trainer.step}: held-out top-1 agreement {point['top1_agreement']}, "
                       f"chain tau proxy {point['chain_tau_proxy']}")
        out_of_time = cfg.max_time_s is not None and time.perf_counter() - started >= cfg.max_time_s
        if trainer.step % cfg.save_every == 0 or trainer.step == trainer.total_steps or out_of_time:
            save_checkpoint(ckpt_dir, trainer.payload(), cfg.keep_checkpoints)
        if out_of_time and trainer.step < trainer.total_steps:
            break
    bar.close()
    if profiler is not None:  # the run ended inside the profiled window: report the steps it had
        profiler.finish()
        trainer.phase_timer = None
    return trainer.step >= trainer.total_steps


def fit_wall_budget(cfg: TrainConfig, setup_s: float, elapsed_s: float) -> TrainConfig:
    """cfg with the time budget that ends the command within cfg.wall_budget_s, after `setup_s` of setup;
    `elapsed_s` is the training time a resumed run already has (the budget counts it). At least MIN_TRAIN_S."""
    left = max(MIN_TRAIN_S, cfg.wall_budget_s - setup_s - WRAP_UP_S)
    budget = elapsed_s + left
    if cfg.time_budget_s is not None:
        budget = min(budget, cfg.time_budget_s)
    return dataclasses.replace(cfg, time_budget_s=budget)


def plan_window_start(step: int) -> int | None:
    """The step whose mark the plan at `step` measures the pace from; None where no plan is made."""
    if step in PLAN_AT_STEPS:
        return step // 2
    if step > PLAN_AT_STEPS[-1] and step % REPLAN_EVERY == 0:
        return step - REPLAN_EVERY
    return None


def planned_steps(cfg: TrainConfig, step: int, elapsed_s: float, s_per_step: float) -> int:
    """The step count that ends the run at cfg.time_budget_s at the measured pace, clamped to [step, cfg.steps].
    Evaluation and saving after the last step are not part of the budget."""
    remaining = max(0.0, cfg.time_budget_s - elapsed_s)
    return max(step, min(cfg.steps, step + int(remaining / max(s_per_step, 1e-9))))


def data_summary(cfg: TrainConfig, sequences, train_seqs, heldout, cache_path: Path, mask_token_id: int,
                 generation_s: float, train_counts: Counter) -> dict:
    mask_hits = sum(s.ids.count(mask_token_id) for s in sequences)
    return {
        "source": cfg.data.source,
        "cache_file": str(cache_path),
        "num_prompts": cfg.data.num_prompts,
        "prompt_offset": cfg.data.prompt_offset,
        "max_new_tokens": cfg.data.max_new_tokens,
        "gen_temperature": cfg.data.gen_temperature,
        "max_seq_len": cfg.data.max_seq_len,
        "sequences": len(sequences),
        "train_sequences": len(train_seqs),
        "heldout_sequences": len(heldout),
        "train_tokens": sum(len(s) for s in train_seqs),
        "train_response_tokens": sum(len(s.response_ids) for s in train_seqs),
        "mask_token_occurrences": mask_hits,  # should be 0: the mask token must never be real text
        "generation_s": round(generation_s, 2),
        # this run's batched generation (runtime.batch_decode): new tokens, decode seconds, tokens/s
        "generation": generation_stats(cache_path),
        "response_vocab_coverage": vocab_coverage(train_counts, heldout),
    }


COVERAGE_SIZES = (4096, 8192, 16384, 32768, 65536)


def response_counts(sequences: list[TrainSequence]) -> Counter:
    """How often each token occurs in the sequences' responses."""
    return Counter(t for s in sequences for t in s.response_ids)


def vocab_coverage(train_counts: Counter, heldout: list[TrainSequence],
                   sizes: tuple[int, ...] = COVERAGE_SIZES) -> dict:
    """The share of the held-out responses' tokens that the N tokens most frequent in the training responses cover,
    per N: what a draft proposing from N tokens only (its lm_head over those rows: at 15 depth rows of Qwen's
    151936-token vocabulary the lm_head is 0.10 ms of a 0.27 ms draft stage on an H100) could still propose.
    Ranked on the training responses, counted on the held-out ones, so the share is out of sample."""
    ranked = [token for token, _ in train_counts.most_common()]
    held = response_counts(heldout)
    total = sum(held.values())
    out = {"distinct_train_response_tokens": len(ranked), "heldout_response_tokens": total}
    for size in sizes:
        top = set(ranked[:size])
        out[str(size)] = round(sum(c for t, c in held.items() if t in top) / total, 6) if total else None
    return out


def loss_curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """[[last step of the bucket, mean loss of the bucket], ...], at most `points` buckets."""
    size = max(1, math.ceil(len(losses) / points))
    return [[min(i + size, len(losses)), round(sum(losses[i:i + size]) / len(losses[i:i + size]), 5)]
            for i in range(0, len(losses), size)]


def write_outputs(trainer: Trainer, out: Path, tokenizer, tcfg: DecoderConfig, dtype: torch.dtype,
                  data_card: dict, copied: list[str], reshaped: list[str], train_counts: Counter) -> dict:
    cfg, head = trainer.cfg, trainer.head
    trainer.flush_losses()
    proxy_after = trainer.record_curve(simulate=True)
    saved = copy.deepcopy(head).to("cpu", dtype)  # the published heads are stored in the serving dtype
    save_draft(saved, out, rope_theta(head.config))
    losses = trainer.losses
    window = max(1, min(10, len(losses) // 5))
    spec = head.spec
    card = {
        "format": 1,
        "target": {"path": str(Path(cfg.target_dir).resolve()), "model_type": tcfg.model_type,
                   "num_layers": tcfg.num_layers, "hidden_size": tcfg.hidden_size, "vocab_size": tcfg.vocab_size},
        "head": {
            "num_layers": len(head.layers), "intermediate_size": head.config.intermediate_size,
            "num_kv_heads": head.config.num_kv_heads, "block_size": spec.block_size,
            "target_layer_ids": list(spec.target_layer_ids), "mask_token_id": spec.mask_token_id,
            "mask_token": tokenizer.convert_ids_to_tokens(spec.mask_token_id),
            "parameters": sum(p.numel() for p in head.parameters()),
            "init": (", ".join([f"trained head {Path(cfg.init_head).resolve()}", *reshaped])
                     if cfg.init_head is not None else
                     f"warm start: {len(copied)} tensors from the last target layers, rest normal(0, 0.02)"
                     if cfg.warm_start else "normal(0, 0.02), norms 1"),
            "saved_dtype": dtype_name(dtype),
        },
        "data": data_card,
        "objective": {"loss": objective_text(cfg.loss), "backend": trainer.loss_backend,
                      "depth_weights": [round(w, 4) for w in trainer.depth_weights.tolist()],
                      "depth_sampling": cfg.depth_sampling,
                      "anchors_per_seq": cfg.anchors_per_seq, "depths": spec.block_size - 1},
        "training": {
            "steps": trainer.step, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "warmup_steps": cfg.warmup(trainer.total_steps), "time_budget_s": cfg.time_budget_s,
            "wall_budget_s": cfg.wall_budget_s,
            "stopped_at_time_budget": trainer.stopped_at_time_budget,
            "schedule": "linear warmup, cosine to 0", "optimizer": f"AdamW betas={list(BETAS)}",
            "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "seed": cfg.seed,
            "device": trainer.device, "device_name": device_name(trainer.device),
            "target_dtype": dtype_name(dtype), "bf16_autocast": trainer.autocast,
            "setup_s": round(trainer.setup_s, 2), "features_s": round(trainer.features_s, 2),
            "time_s": round(trainer.elapsed_s, 2), "s_per_step": round(trainer.elapsed_s / max(1, trainer.step), 4),
            "positions": trainer.positions,
            "positions_per_s": round(trainer.positions / max(trainer.elapsed_s, 1e-9)),
            "resumed_at_steps": trainer.resumed_from,
        },
        "loss": {"first": round(sum(losses[:window]) / window, 5), "final": round(sum(losses[-window:]) / window, 5),
                 "min": round(min(losses), 5), "curve": loss_curve(losses)},
        "acceptance_proxy": {"before": trainer.proxy_before, "after": proxy_after},
        "agreement_curve": trainer.curve,
    }
    card["history"] = run_history(cfg.init_head, card)
    (out / CARD).write_text(json.dumps(card, indent=2) + "\n")
    write_token_counts(out / TOKEN_COUNTS, with_earlier_counts(train_counts, cfg.init_head))
    return card


def with_earlier_counts(counts: Counter, init_head: Path | None) -> Counter:
    """This run's training response token counts added to the continued head's own (its runs so far): what
    `build --draft-vocab` ranks by."""
    earlier = Path(init_head) / TOKEN_COUNTS if init_head is not None else None
    return counts + read_token_counts(earlier) if earlier is not None and earlier.is_file() else counts


def objective_text(loss: LossConfig) -> str:
    what = ("cross-entropy to the target's own next token" if loss.kind == "ce" else
            f"forward KL(softmax(target/{loss.temperature:g}) || softmax(head))")
    weights = "uniform over depths" if loss.decay_gamma is None else f"depth k weighted exp(-(k-1)/{loss.decay_gamma:g})"
    return f"{what}, {weights}"


def run_history(init_head: Path | None, card: dict) -> list[dict]:
    """The head's runs so far, oldest first: the init head's card history (if it has one) plus this run, with
    response tokens summed over runs (runs that reuse prompts count their tokens again: it is what the head
    has been trained on, not distinct data)."""
    history: list[dict] = []
    if init_head is not None and (Path(init_head) / CARD).is_file():
        history = list(json.loads((Path(init_head) / CARD).read_text()).get("history", []))
    before = history[-1]["cumulative_response_tokens"] if history else 0
    tokens = card["data"]["train_response_tokens"]
    after = card["acceptance_proxy"]["after"]
    history.append({
        "date": time.strftime("%Y-%m-%d"), "num_layers": card["head"]["num_layers"], "steps": card["training"]["steps"],
        "train_response_tokens": tokens, "cumulative_response_tokens": before + tokens,
        "positions": card["training"]["positions"], "loss": card["objective"]["loss"],
        "heldout_top1_depth1": after["top1_agreement_per_depth"][0], "chain_tau_proxy": after["chain_tau_proxy"],
        "heldout_simulated_tau": after.get("simulated_tau"),
    })
    return history
