"""`jetspec-trt train` on the tiny preset: the training forward equals the inference path, a short run lowers
the loss and writes a head that builds into a lossless engine, resume continues exactly, bad input fails in
one line."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
import types

import pytest
import torch

from jetspec_trt.builders.engine_builder import BuildConfig, build_engine
from jetspec_trt.cli import main
from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import load_draft, load_target
from jetspec_trt.models.presets import write_random_pair
from jetspec_trt.plugins.tree_attention import causal_mask
from jetspec_trt.runtime.config import TreeConfig
from jetspec_trt.runtime.decoder import Decoder
from jetspec_trt.runtime.engine import Engine
from jetspec_trt.train import data as train_data
from jetspec_trt.train.data import DataConfig, generate_responses, generation_stats
from jetspec_trt.train.data import TrainSequence
from jetspec_trt.train.features import FeatureStore
from jetspec_trt.train.objective import BlockBatch, depth_logits
from jetspec_trt.train.trainer import (MIN_TRAIN_S, WRAP_UP_S, TrainConfig, checkpoint_files, fit_wall_budget,
                                      planned_steps, train)
from tests.helpers import tiny_runtime
from tests.helpers import invoke_cli

WORDS = "sort list tree graph python rust fast slow hello world write explain code alpha beta".split()
STEPS = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_random_pair("tiny", root / "target", root / "draft", seed=0)
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(24):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
            # both accepted record shapes
            record = {"prompt": text} if i % 2 else {"messages": [{"role": "user", "content": text}]}
            f.write(json.dumps(record) + "\n")
    return root


def train_args(root, out, *extra):
    return ["train", "--target", str(root / "target"), "--output", str(out), "--data", str(root / "prompts.jsonl"),
            "--num-prompts", "24", "--max-new-tokens", "48", "--gen-batch-size", "8", "--steps", str(STEPS),
            "--batch-size", "4", "--lr", "1e-3", "--block-size", "8", "--num-layers", "1", "--anchors-per-seq", "16",
            "--heldout", "4", "--save-every", "20", "--eval-every", "10", "--quiet", *extra]


def invoke(argv, capsys):
    return invoke_cli(argv, capsys)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run") / "head"
    with pytest.raises(SystemExit) as exit_info:
        main(train_args(tiny, out))
        raise SystemExit(0)
    assert exit_info.value.code == 0
    return out


# ------------------------------------------------------------------------------- training forward == inference


def inference_depth_logits(target, draft, ids: torch.Tensor, anchor: int) -> torch.Tensor:
    """Depth logits through the serving path: target prefill of the context, extend_context, draft pass."""
    block = draft.spec.block_size
    runtime = tiny_runtime(draft, TreeConfig(16, 4, block - 1), block_size=block,
                           mask_token_id=draft.spec.mask_token_id)
    decoder = Decoder(target, draft, runtime)
    capture = draft.spec.target_layer_ids
    with torch.no_grad():
        out = target(ids[:anchor], torch.arange(anchor), decoder.target_cache, causal_mask(anchor), capture)
        draft.extend_context(out.features, torch.arange(anchor), decoder.draft_cache)
        return decoder.draft_depth_logits(int(ids[anchor]), anchor, block - 1)


@pytest.mark.parametrize("which", ["random preset head", "trained head"])
def test_training_forward_matches_inference(tiny, trained, which):
    target = load_target(tiny / "target")
    draft = load_draft(tiny / "draft" if which == "random preset head" else trained)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=gen) for n in (50, 37)]
    # several anchors per sequence (cross-block leaks would show), one padding anchor, sequences of two lengths
    anchors = torch.tensor([[1, 9, 24, 48], [5, 20, 35, 0]])
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    # the features come from the training data path (FeatureStore), as in the trainer
    store = FeatureStore.build(target, [TrainSequence(s[:1].tolist(), s[1:].tolist()) for s in seqs],
                               draft.spec.target_layer_ids, progress=False)
    features = store.padded_features([0, 1])
    assert features.shape[:2] == (2, 50) and not features[1, 37:].any()
    tokens = torch.stack([torch.cat([s, s.new_zeros(50 - len(s))]) for s in seqs])
    batch = BlockBatch(features, torch.tensor([50, 37]), anchors, tokens.gather(1, anchors), valid)
    with torch.no_grad():
        train_logits = depth_logits(draft, target, batch)
    assert train_logits.shape == (2, 4, draft.spec.block_size - 1, target.config.vocab_size)
    for row in range(2):
        for k in range(4):
            if valid[row, k]:
                served = inference_depth_logits(target, draft, seqs[row], int(anchors[row, k]))
                diff = (served - train_logits[row, k]).abs().max().item()
                assert diff < 1e-4, f"{which}: sequence {row} anchor {int(anchors[row, k])}: max |diff| {diff}"


def test_shared_context_rows_equal_repeated_context(tiny):
    """Rows of one sequence share its context K/V (BlockBatch.row_sequence): the loss and the head's gradients
    equal those of every row carrying its own copy of the context (fp32; the gradients differ only in the order
    the rows' contributions are summed)."""
    target = load_target(tiny / "target")
    draft = load_draft(tiny / "draft")
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 256, (n,), generator=gen) for n in (50, 37)]
    store = FeatureStore.build(target, [TrainSequence(s[:1].tolist(), s[1:].tolist()) for s in seqs],
                               draft.spec.target_layer_ids, progress=False)
    tokens = torch.stack([torch.cat([s, s.new_zeros(50 - len(s))]) for s in seqs])
    row_sequence = torch.tensor([0, 0, 1, 1])  # two rows per sequence, as step_rows splits anchor groups
    anchors = torch.tensor([[1, 9], [24, 40], [5, 20], [30, 0]])
    valid = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    anchor_tokens = tokens[row_sequence].gather(1, anchors)
    labels = torch.randint(0, target.config.vocab_size, (int(valid.sum()), draft.spec.block_size - 1), generator=gen)
    full = store.padded_features([0, 1])
    shared = BlockBatch(full, store.lengths, anchors, anchor_tokens, valid, row_sequence)
    repeated = BlockBatch(full[row_sequence], store.lengths[row_sequence], anchors, anchor_tokens, valid)

    def loss_and_grads(batch):
        draft.zero_grad(set_to_none=True)
        logits = depth_logits(draft, target, batch)[valid]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in draft.named_parameters()}

    with torch.enable_grad():
        for param in draft.parameters():
            param.requires_grad_(True)
        loss_shared, grads_shared = loss_and_grads(shared)
        loss_repeated, grads_repeated = loss_and_grads(repeated)
    assert (loss_shared - loss_repeated).abs().item() <= 1e-6
    for name, grad in grads_repeated.items():
        assert (grads_shared[name] - grad).abs().max().item() <= 1e-6, name


def test_step_rows_host_indices_select_what_the_masks_select(tiny, trained):
    """step_rows builds its indices on the host: hidden_index picks block_hidden's rows in the boolean-mask order of
    `valid` (depth >= 1), labels are each row's next token, and a sequence's anchor groups share one features row."""
    from jetspec_trt.train.head import new_head
    from jetspec_trt.train.trainer import Trainer

    target = load_target(tiny / "target")
    gen = torch.Generator().manual_seed(3)
    seqs = [TrainSequence(s[:3].tolist(), s[3:].tolist())
            for s in (torch.randint(0, 256, (n,), generator=gen) for n in (40, 70, 25))]
    head = new_head(target, 1, 8, (3,), 259, gen).train()
    cfg = TrainConfig("t", "o", batch_size=3, block_size=8, anchors_per_seq=16, anchor_group=4, heldout=0,
                      progress=False)
    trainer = Trainer(cfg, target, head, seqs, [], gen, "cpu")
    rows = trainer.step_rows([2, 0, 1], 16, gen, sample_depths=True)
    n, k = rows.batch.anchors.shape
    assert rows.batch.features.shape[:2] == (3, 70) and torch.equal(rows.batch.lengths, torch.tensor([25, 40, 70]))
    assert rows.batch.row_sequence.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and k == 4
    hidden = torch.randn(n, k, 8, 5)
    assert torch.equal(hidden.reshape(-1, 5)[rows.hidden_index], hidden[:, :, 1:][rows.valid])
    ids = [seqs[r].ids for r in (2, 0, 1)]
    expected = [ids[int(rows.batch.row_sequence[i])][int(rows.batch.anchors[i, j]) + d + 1]
                for i, j, d in rows.valid.nonzero().tolist()]
    assert rows.labels.tolist() == expected and rows.depth.tolist() == rows.valid.nonzero()[:, 2].tolist()


# ------------------------------------------------------------------------------------------- a short training run


def test_short_run_lowers_loss_and_builds_lossless_engine(tiny, trained, tmp_path):
    card = json.loads((trained / "training_card.json").read_text())
    assert card["training"]["steps"] == STEPS
    assert card["loss"]["final"] < 0.7 * card["loss"]["first"], card["loss"]
    assert card["head"]["mask_token_id"] == 259 and card["head"]["target_layer_ids"] == [3]
    assert card["data"]["sequences"] == 24 and card["data"]["heldout_sequences"] == 4
    assert len(card["acceptance_proxy"]["after"]["top1_agreement_per_depth"]) == 7
    assert card["objective"]["backend"] == "torch" and card["objective"]["depth_weights"][0] == 1.0
    assert card["objective"]["depth_weights"][6] == pytest.approx(2.718281828 ** (-6 / 7), rel=1e-4)
    # --eval-every 10: curve points at steps 0 (before), 10, 20, 30 and 40 (after), each with the followed depths
    assert [p["step"] for p in card["agreement_curve"]] == [0, 10, 20, 30, 40]
    assert list(card["agreement_curve"][-1]["top1_agreement"]) == ["1", "2", "4"]
    assert card["training"]["positions"] > 0 and card["training"]["positions_per_s"] > 0
    assert card["history"][-1]["cumulative_response_tokens"] == card["data"]["train_response_tokens"]
    # tau of the engine's trees simulated before and after (a tau counts the bonus token: >= 1), not mid-run
    after = card["acceptance_proxy"]["after"]
    assert list(after["simulated_tau"]) == ["16", "64", "256"] and all(t >= 1.0 for t in after["simulated_tau"].values())
    assert card["acceptance_proxy"]["before"]["simulated_tau"] is not None
    assert card["agreement_curve"][1]["simulated_tau"] is None
    assert card["history"][-1]["heldout_simulated_tau"] == after["simulated_tau"]
    config = json.loads((trained / "config.json").read_text())
    assert config["block_size"] == 8 and config["num_target_layers"] == 6
    assert config["dflash_config"] == {"target_layer_ids": [3], "mask_token_id": 259, "causal_head": True,
                                       "target_hidden_size": 128}
    assert [p.name for p in checkpoint_files(trained / "checkpoints")] == ["step-0000020.pt", "step-0000040.pt"]

    engine_dir = tmp_path / "engine"
    build_engine(BuildConfig(tiny / "target", trained, engine_dir, tree=TreeConfig(32, 4, 7), dtype="float32",
                             max_seq_len=256, progress=False))
    engine = Engine.load(engine_dir)
    for prompt in ("sort the list", "hello world in rust"):
        spec = engine.generate(prompt, max_new_tokens=40, chat=True)
        plain = engine.generate(prompt, max_new_tokens=40, chat=True, speculative=False)
        assert spec.token_ids == plain.token_ids
        assert spec.stats.rounds < 40  # speculation ran (the bonus token alone gives one token per round)


def test_cached_responses_are_reused(tiny, trained, monkeypatch):
    """A re-run with the same settings reads the jsonl cache and never loads the generation model."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the cached responses should have been reused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    cfg = DataConfig(str(tiny / "prompts.jsonl"), 24, 48, 0.0, 8)
    sequences, path = generate_responses(tiny / "target", cfg, trained, "cpu", torch.float32, seed=0,
                                         progress=False)
    assert len(sequences) == 24 and path.parent == trained / train_data.DATA_DIR
    assert all(s.prompt_ids[0] == 257 for s in sequences)  # <|im_start|>: the chat template was applied


def test_resume_continues_at_saved_step_and_matches(tiny, trained, tmp_path, capsys):
    """Resuming from the step-20 checkpoint ends on the same weights as the uninterrupted run."""
    out = tmp_path / "head"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(trained / "data", out / "data")
    shutil.copy2(trained / "checkpoints" / "step-0000020.pt", out / "checkpoints")
    code, _, err = invoke(train_args(tiny, out, "--resume"), capsys)
    assert code == 0, err
    card = json.loads((out / "training_card.json").read_text())
    assert card["training"]["resumed_at_steps"] == [20] and card["training"]["steps"] == STEPS
    reference = json.loads((trained / "training_card.json").read_text())
    assert card["loss"]["curve"] == reference["loss"]["curve"]
    resumed, uninterrupted = load_draft(out).state_dict(), load_draft(trained).state_dict()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_time_limit_stops_with_checkpoint(tiny, trained, tmp_path):
    out = tmp_path / "head"
    shutil.copytree(trained / "data", out / "data")
    cfg = TrainConfig(tiny / "target", out, DataConfig(str(tiny / "prompts.jsonl"), 24, 48, 0.0, 8), steps=STEPS,
                      batch_size=2, block_size=8, anchors_per_seq=4, heldout=4, max_time_s=0.0, progress=False)
    result = train(cfg)
    assert not result.finished and result.step == 1
    assert [p.name for p in checkpoint_files(out / "checkpoints")] == ["step-0000001.pt"]
    assert not (out / "config.json").exists()
    with pytest.raises(JetSpecError, match="--resume to continue"):
        train(dataclasses.replace(cfg, max_time_s=None))


# --------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    (lambda a: [x if x != "TARGET" else "/nonexistent/target" for x in a], "target directory /nonexistent/target"),
    (lambda a: a + ["--target-layer-ids", "1,99"], "--target-layer-ids '1,99' must be distinct layer indices"),
    (lambda a: a + ["--target-layer-ids", "one,two"], "--target-layer-ids must be 'auto' or comma-separated"),
    (lambda a: a + ["--resume"], "--resume: no checkpoint"),
    (lambda a: a + ["--block-size", "1"], "--block-size must be >= 2"),
    (lambda a: a + ["--device", "tpu"], "--device must be cpu or cuda"),
    (lambda a: a + ["--prompt-offset", "-1"], "--prompt-offset must be >= 0"),
    (lambda a: a + ["--gen-prefill-tokens", "0"], "--gen-prefill-tokens must be >= 1"),
])
def test_bad_input_one_line_error(tiny, tmp_path, capsys, change, message):
    args = train_args(tiny, tmp_path / "out")
    args[args.index("--target") + 1] = "TARGET" if "nonexistent" in message else args[args.index("--target") + 1]
    code, out, err = invoke(change(args), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_bad_prompt_file(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    args = train_args(tiny, tmp_path / "out")
    args[args.index("--data") + 1] = str(bad)
    code, _, err = invoke(args, capsys)
    assert code == 2 and 'bad.jsonl:1: expected {"messages": [...]} or {"prompt": "..."}' in err


# ------------------------------------------------------------------------------------------ feature store, budget


def test_feature_store_teacher_logits_equal_a_full_target_pass(tiny):
    target = load_target(tiny / "target")
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 256, (n,), generator=gen) for n in (23, 40, 9)]
    store = FeatureStore.build(target, [TrainSequence(s[:2].tolist(), s[2:].tolist()) for s in seqs], (0, 2),
                               progress=False)
    positions = torch.tensor([[[0, 5, 39]], [[22, 1, 17]]])  # [N=2, K=1, D=3] of sequences 1 and 0
    valid = torch.ones_like(positions, dtype=torch.bool)
    with torch.no_grad():  # the KL teacher: lm_head over the stored final hidden states of those rows
        got = target.lm_head(store.final_hidden[store.flat_index([1, 0], positions, valid)]).float()
    for row, seq in ((0, seqs[1]), (1, seqs[0])):
        cache = target.new_cache(64, 16)
        with torch.no_grad():
            full = target(seq, torch.arange(len(seq)), cache, causal_mask(len(seq)), (0, 2))
        assert torch.allclose(got[row * 3:(row + 1) * 3], full.logits[positions[row, 0]], atol=1e-5)
        assert torch.allclose(store.padded_features([1, 0])[row, : len(seq)], full.features, atol=1e-6)


def test_time_budget_plans_the_schedule():
    cfg = TrainConfig("t", "o", steps=10_000, time_budget_s=100.0)
    assert planned_steps(cfg, step=20, elapsed_s=10.0, s_per_step=0.5) == 20 + 180
    assert planned_steps(cfg, step=20, elapsed_s=200.0, s_per_step=0.5) == 20  # already over: stop now
    assert planned_steps(cfg, step=20, elapsed_s=0.0, s_per_step=1e-6) == 10_000  # capped by --steps


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _PacedTrainer:
    """run_loop's view of a Trainer whose steps take step_s(step) seconds of a fake clock."""

    def __init__(self, cfg, clock, step_s):
        self.cfg, self.clock, self.step_s = cfg, clock, step_s
        self.step, self.total_steps, self.elapsed_s, self.stopped_at_time_budget = 0, cfg.steps, 0.0, False
        self.scheduler = types.SimpleNamespace(get_last_lr=lambda: [1e-3])

    def train_step(self) -> float:
        self.clock.now += self.step_s(self.step)
        self.step += 1
        return 1.0

    def payload(self) -> dict:
        return {}


@pytest.mark.parametrize("slow_from, slow_s, steps, stopped", [
    (300, 1.0, 370, True),  # pace drops 10x after the last fixed plan: the deadline stops it at 100 s
    (250, 0.15, 750, False),  # a drift: the re-plans every 200 steps end the schedule at 100 s
])
def test_time_budget_is_a_deadline_when_the_pace_changes(monkeypatch, tmp_path, slow_from, slow_s, steps, stopped):
    import jetspec_trt.train.trainer as trainer_module

    clock = _Clock()
    monkeypatch.setattr(trainer_module.time, "perf_counter", clock)
    monkeypatch.setattr(trainer_module, "save_checkpoint", lambda *args: None)
    cfg = TrainConfig("t", "o", steps=100_000, time_budget_s=100.0, save_every=10**9, progress=False)
    trainer = _PacedTrainer(cfg, clock, lambda step: 0.1 if step < slow_from else slow_s)
    assert trainer_module.run_loop(trainer, tmp_path) is True
    assert abs(trainer.step - steps) <= 1 and trainer.stopped_at_time_budget is stopped
    assert trainer.elapsed_s == pytest.approx(100.0, abs=1.0)


def test_wall_budget_leaves_training_what_the_setup_did_not_use():
    cfg = TrainConfig("t", "o", steps=10_000, wall_budget_s=600.0)
    assert fit_wall_budget(cfg, setup_s=346.0, elapsed_s=0.0).time_budget_s == 600.0 - 346.0 - WRAP_UP_S
    assert fit_wall_budget(cfg, setup_s=30.0, elapsed_s=100.0).time_budget_s == 100.0 + 600.0 - 30.0 - WRAP_UP_S
    assert fit_wall_budget(cfg, setup_s=900.0, elapsed_s=0.0).time_budget_s == MIN_TRAIN_S  # setup ran over
    both = dataclasses.replace(cfg, time_budget_s=300.0)
    assert fit_wall_budget(both, setup_s=30.0, elapsed_s=0.0).time_budget_s == 300.0  # the tighter one
    assert fit_wall_budget(both, setup_s=346.0, elapsed_s=0.0).time_budget_s == 600.0 - 346.0 - WRAP_UP_S


def test_wall_budget_run_finishes_within_it(tiny, tmp_path, capsys):
    out = tmp_path / "head"
    started = time.perf_counter()
    code, _, err = invoke(train_args(tiny, out, "--steps", "100000", "--wall-budget", "52"), capsys)
    assert code == 0, err
    card = json.loads((out / "training_card.json").read_text())["training"]
    assert card["wall_budget_s"] == 52.0 and card["steps"] < 100000
    assert card["time_budget_s"] == pytest.approx(max(MIN_TRAIN_S, 52.0 - card["setup_s"] - WRAP_UP_S), abs=0.5)
    assert card["time_s"] <= card["time_budget_s"] + 2.0
    assert time.perf_counter() - started < 52.0


def test_time_budget_run_finishes_with_a_head(tiny, tmp_path, capsys):
    out = tmp_path / "head"
    code, _, err = invoke(train_args(tiny, out, "--steps", "100000", "--time-budget", "3"), capsys)
    assert code == 0, err
    card = json.loads((out / "training_card.json").read_text())
    # The pace (hence the step count) depends on the machine's load: only "stopped by the budget" is checked.
    assert 2 <= card["training"]["steps"] < 100000 and card["training"]["time_budget_s"] == 3.0


# ------------------------------------------------------------------------------------- init head, generation budget


def test_init_head_continues_from_the_trained_weights(tiny, trained, tmp_path, capsys):
    """--init-head starts from the given head: one step at a negligible learning rate ends where it began, and the
    run takes the head's shape (no shape flags needed beyond the defaults)."""
    out = tmp_path / "continued"
    shutil.copytree(trained / "data", out / "data")
    code, _, err = invoke(train_args(tiny, out, "--init-head", str(trained), "--steps", "1", "--lr", "1e-12",
                                     "--warmup-steps", "0"), capsys)
    assert code == 0, err
    card = json.loads((out / "training_card.json").read_text())
    assert card["head"]["init"].startswith("trained head") and card["head"]["block_size"] == 8
    before, after = load_draft(trained).state_dict(), load_draft(out).state_dict()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=1e-6, msg=name)
    # the held-out proxy before training is the trained head's, not a random head's
    reference = json.loads((trained / "training_card.json").read_text())["acceptance_proxy"]["after"]
    assert card["acceptance_proxy"]["before"]["chain_tau_proxy"] == pytest.approx(reference["chain_tau_proxy"],
                                                                                 abs=1e-6)
    assert card["acceptance_proxy"]["before"]["simulated_tau"] == reference["simulated_tau"]


def test_init_head_grows_by_identity_layers(tiny, trained, tmp_path, capsys):
    """--num-layers above the trained head's adds layers that start as identities: before any training the grown
    head's held-out proxy is the trained head's, and its history continues the trained head's."""
    out = tmp_path / "grown"
    shutil.copytree(trained / "data", out / "data")
    code, _, err = invoke(train_args(tiny, out, "--init-head", str(trained), "--num-layers", "2", "--steps", "2"),
                          capsys)
    assert code == 0, err
    card = json.loads((out / "training_card.json").read_text())
    assert card["head"]["num_layers"] == 2 and "grown by layers [1]" in card["head"]["init"]
    reference = json.loads((trained / "training_card.json").read_text())
    assert card["acceptance_proxy"]["before"]["top1_agreement_per_depth"] == \
        reference["acceptance_proxy"]["after"]["top1_agreement_per_depth"]
    assert [h["num_layers"] for h in card["history"]] == [1, 2]
    assert card["history"][1]["cumulative_response_tokens"] == 2 * reference["data"]["train_response_tokens"]
    # token counts add up over the runs too (the same responses twice here)
    counts = json.loads((out / "token_counts.json").read_text())
    assert counts["response_tokens"] == 2 * reference["data"]["train_response_tokens"]


def test_init_head_narrows_mlp_to_its_strongest_neurons(tiny, trained, tmp_path, capsys):
    """--intermediate-size below the trained head's keeps each MLP's strongest neurons: a head whose dropped
    neurons had zero down columns starts exactly where it was (held-out proxy equal), the written config says the
    new width, and it grows and narrows in one run."""
    from safetensors.torch import load_file, save_file

    width = json.loads((trained / "config.json").read_text())["intermediate_size"]
    keep = width // 2
    weak = tmp_path / "weak"
    shutil.copytree(trained, weak, ignore=shutil.ignore_patterns("checkpoints", "data"))
    state = load_file(weak / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    dropped = torch.randperm(width, generator=gen)[: width - keep]
    state["layers.0.mlp.down_proj.weight"][:, dropped] = 0  # these neurons contribute nothing
    save_file(state, weak / "model.safetensors")
    proxies = []
    for name, extra in (("same", ()), ("narrow", ("--intermediate-size", str(keep))),
                        ("narrow-grown", ("--intermediate-size", str(keep), "--num-layers", "2"))):
        out = tmp_path / name
        shutil.copytree(trained / "data", out / "data")
        code, _, err = invoke(train_args(tiny, out, "--init-head", str(weak), "--steps", "1", "--lr", "1e-12",
                                         *extra), capsys)
        assert code == 0, err
        card = json.loads((out / "training_card.json").read_text())
        proxies.append(card["acceptance_proxy"]["before"])
        if name != "same":
            assert card["head"]["intermediate_size"] == keep and "narrowed" in card["head"]["init"]
            assert json.loads((out / "config.json").read_text())["intermediate_size"] == keep
            assert load_draft(out).layers[0].mlp.down_proj.weight.shape[1] == keep
    assert proxies[1]["top1_agreement_per_depth"] == proxies[0]["top1_agreement_per_depth"]
    assert proxies[1]["loss"] == pytest.approx(proxies[0]["loss"], abs=1e-4)
    assert proxies[2]["loss"] == pytest.approx(proxies[0]["loss"], abs=1e-4)
    # the narrowed, grown head builds into an engine that drafts and stays lossless
    build_engine(BuildConfig(tiny / "target", tmp_path / "narrow-grown", tmp_path / "engine",
                             tree=TreeConfig(32, 4, 7), dtype="float32", max_seq_len=256, progress=False))
    engine = Engine.load(tmp_path / "engine")
    spec = engine.generate("sort the list", max_new_tokens=24, chat=True)
    assert spec.token_ids == engine.generate("sort the list", max_new_tokens=24, chat=True,
                                             speculative=False).token_ids
    code, _, err = invoke(train_args(tiny, tmp_path / "wide", "--init-head", str(weak), "--intermediate-size",
                                     str(width + 1)), capsys)
    assert code == 2 and err.count("\n") == 1 and "can be narrowed" in err


def test_init_head_widens_kv_heads_exactly(tiny, trained, tmp_path, capsys):
    """--num-kv-heads 4 on a 2-KV-head head repeats each KV head over its query group: before any training the
    held-out proxy is the trained head's; the wider head builds into a lossless engine; a count that is not a
    multiple, or does not divide the heads, fails in one line."""
    out = tmp_path / "mha"
    shutil.copytree(trained / "data", out / "data")
    code, _, err = invoke(train_args(tiny, out, "--init-head", str(trained), "--num-kv-heads", "4", "--steps", "1",
                                     "--lr", "1e-12", "--warmup-steps", "0"), capsys)
    assert code == 0, err
    card = json.loads((out / "training_card.json").read_text())
    assert card["head"]["num_kv_heads"] == 4 and "KV heads widened 2 -> 4" in card["head"]["init"]
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 4
    reference = json.loads((trained / "training_card.json").read_text())["acceptance_proxy"]["after"]
    assert card["acceptance_proxy"]["before"]["top1_agreement_per_depth"] == reference["top1_agreement_per_depth"]
    assert card["acceptance_proxy"]["before"]["loss"] == pytest.approx(reference["loss"], abs=1e-4)
    build_engine(BuildConfig(tiny / "target", out, tmp_path / "engine", tree=TreeConfig(32, 4, 7), dtype="float32",
                             max_seq_len=256, progress=False))
    engine = Engine.load(tmp_path / "engine")
    spec = engine.generate("hello world in rust", max_new_tokens=24, chat=True)
    assert spec.token_ids == engine.generate("hello world in rust", max_new_tokens=24, chat=True,
                                             speculative=False).token_ids
    for bad in ("3", "1"):
        code, _, err = invoke(train_args(tiny, tmp_path / "bad", "--init-head", str(trained), "--num-kv-heads", bad),
                              capsys)
        assert code == 2 and err.count("\n") == 1 and "--num-kv-heads" in err


def test_anchor_groups_change_cost_not_result(tiny, trained, tmp_path, capsys):
    """Splitting a sequence's blocks into attention rows of 3 anchors gives the held-out proxy of one row per
    sequence: blocks never see each other, so only the masked-out keys change."""
    proxies = []
    for group in ("3", "512"):
        out = tmp_path / f"group{group}"
        shutil.copytree(trained / "data", out / "data")
        code, _, err = invoke(train_args(tiny, out, "--init-head", str(trained), "--steps", "1", "--lr", "1e-12",
                                         "--anchor-group", group), capsys)
        assert code == 0, err
        proxies.append(json.loads((out / "training_card.json").read_text())["acceptance_proxy"]["before"])
    grouped, whole = proxies
    assert grouped["anchors"] == whole["anchors"] > 3 * 4
    assert grouped["top1_agreement_per_depth"] == whole["top1_agreement_per_depth"]
    assert grouped["chain_tau_proxy"] == whole["chain_tau_proxy"]
    assert grouped["loss"] == pytest.approx(whole["loss"], abs=2e-4)


def test_profile_steps_writes_the_report_and_trains_as_usual(tiny, trained, tmp_path, capsys):
    """--profile-steps 2: two warm-up steps, two traced ones, a report with every phase and the top ops; the run
    still trains its 5 steps and writes its head."""
    out = tmp_path / "profiled"
    shutil.copytree(trained / "data", out / "data")
    code, stdout, err = invoke(train_args(tiny, out, "--steps", "5", "--profile-steps", "2"), capsys)
    assert code == 0, err
    report = json.loads((out / "profile_steps.json").read_text())
    assert report["steps_profiled"] == 2 and len(report["step_s"]) == 2 and len(report["warmup_step_s"]) == 2
    assert report["first_step"] == 3 and report["top_ops_by"] == "self CPU time"
    assert [p["name"] for p in report["phases"]] == ["rows", "head_forward", "loss", "backward", "optimizer",
                                                     "loss_item"]
    assert all(p["s_per_step"] > 0 and p["host_s_per_step"] > 0 for p in report["phases"]) and report["mean_step_s"] > 0
    assert 10 <= len(report["top_ops"]) <= 25 and all(op["self_cpu_ms_per_step"] >= 0 for op in report["top_ops"])
    assert "profiled 2 training steps" in stdout + err and "head_forward" in stdout + err  # the log's table
    assert json.loads((out / "training_card.json").read_text())["training"]["steps"] == 5


def test_kl_objective_trains_from_the_stored_final_hidden(tiny, trained, tmp_path, capsys):
    out = tmp_path / "kl"
    shutil.copytree(trained / "data", out / "data")
    code, _, err = invoke(train_args(tiny, out, "--loss", "kl", "--loss-gamma", "0", "--steps", "3"), capsys)
    assert code == 0, err
    card = json.loads((out / "training_card.json").read_text())
    assert card["objective"]["loss"].startswith("forward KL") and "uniform" in card["objective"]["loss"]
    assert card["objective"]["depth_weights"] == [1.0] * 7


def test_init_head_shape_must_agree_with_flags(tiny, trained, tmp_path, capsys):
    code, _, err = invoke(train_args(tiny, tmp_path / "out", "--init-head", str(trained), "--block-size", "4"),
                          capsys)
    assert code == 2 and err.count("\n") == 1
    assert "has --block-size 8, not 4; drop --block-size" in err
    code, _, err = invoke(train_args(tiny, tmp_path / "out", "--init-head", str(trained), "--warm-start"), capsys)
    assert code == 2 and "--init-head and --warm-start exclude each other" in err


def test_generation_time_budget_stops_and_a_later_run_completes(tiny, tmp_path):
    """A zero generation budget generates nothing (no target load); the same data settings without it fill the same
    cache file."""
    cfg = DataConfig(str(tiny / "prompts.jsonl"), 6, 8, 0.0, 2, gen_time_budget_s=0.0)
    sequences, path = generate_responses(tiny / "target", cfg, tmp_path, "cpu", torch.float32, seed=0,
                                         progress=False)
    assert sequences == [] and not path.exists()
    full, full_path = generate_responses(tiny / "target", dataclasses.replace(cfg, gen_time_budget_s=None), tmp_path,
                                         "cpu", torch.float32, seed=0, progress=False)
    assert full_path == path and len(full) == 6
    made = generation_stats(path)
    assert made["prompts"] == 6
    # A zero budget over a full cache trains on it as is and keeps the stats of the call that generated it.
    again, again_path = generate_responses(tiny / "target", cfg, tmp_path, "cpu", torch.float32, seed=0,
                                           progress=False)
    assert again_path == path and again == full and generation_stats(path) == made


def test_sampled_responses_are_new_text_per_seed(tiny, tmp_path):
    """--gen-temperature > 0: the same prompts answered under another seed are other responses, in a cache of their
    own; the same seed reproduces its cache's responses; greedy ones are another cache again."""
    def responses(temperature, seed, out):
        cfg = DataConfig(str(tiny / "prompts.jsonl"), 6, 8, temperature, 2)
        sequences, path = generate_responses(tiny / "target", cfg, tmp_path / out, "cpu", torch.float32, seed=seed,
                                             progress=False)
        return [s.response_ids for s in sequences], path.name

    greedy, greedy_key = responses(0.0, 0, "a")
    one, one_key = responses(1.0, 0, "b")
    again, again_key = responses(1.0, 0, "c")
    other, other_key = responses(1.0, 1, "d")
    assert len(one) == 6 and one == again and one_key == again_key
    assert other != one and len({greedy_key, one_key, other_key}) == 3
    assert one != greedy


def test_packs_group_consecutive_sequences():
    from jetspec_trt.train.features import packs

    assert packs([5, 5, 5, 20, 3], 12) == [(0, 2), (2, 1), (3, 1), (4, 1)]
    assert packs([5, 5, 5, 20, 3], 0) == [(i, 1) for i in range(5)]
    assert packs([3, 3, 3], 100) == [(0, 3)] and packs([], 8) == []


def test_packed_feature_pass_equals_per_sequence(tiny):
    """Packing sequences into one forward (block-diagonal causal mask, RoPE restarting per sequence) gives the
    per-sequence features and final hidden states, up to float32 rounding; a sequence over the pack size runs
    alone."""
    target = load_target(tiny / "target")
    gen = torch.Generator().manual_seed(3)
    seqs = [TrainSequence(s[:2].tolist(), s[2:].tolist())
            for s in (torch.randint(0, 256, (n,), generator=gen) for n in (23, 40, 9, 70, 12))]
    alone = FeatureStore.build(target, seqs, (0, 2), progress=False)
    packed = FeatureStore.build(target, seqs, (0, 2), progress=False, pack_tokens=64)
    torch.testing.assert_close(packed.features, alone.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.final_hidden, alone.final_hidden, rtol=1e-4, atol=1e-5)
    assert torch.equal(packed.offsets, alone.offsets) and torch.equal(packed.lengths, alone.lengths)


def test_feature_store_placement():
    from jetspec_trt.train.features import gather, store_on_host

    cuda = torch.device("cuda")
    assert store_on_host("host", 10, cuda) and not store_on_host("device", 10**15, cuda)
    assert not store_on_host("host", 10, torch.device("cpu"))  # a CPU run has no other place
    table = torch.arange(12.0).view(6, 2)
    assert torch.equal(gather(table, torch.tensor([4, 0])), torch.tensor([[8.0, 9.0], [0.0, 1.0]]))
    with pytest.raises(JetSpecError, match="--feature-store must be one of auto, device, host"):
        TrainConfig("t", "o", feature_store="disk").validate()


def test_depth_sampling_keeps_rows_at_their_weight(tiny, trained, tmp_path, capsys):
    """With depth sampling a step supervises depth k's rows with probability w_k: the kept share of rows is
    sum(w)/depths, and the card says which estimator ran."""
    positions = {}
    for flag in ("--depth-sampling", "--no-depth-sampling"):
        out = tmp_path / flag
        shutil.copytree(trained / "data", out / "data")
        code, _, err = invoke(train_args(tiny, out, "--init-head", str(trained), "--steps", "4", "--lr", "1e-12",
                                         flag), capsys)
        assert code == 0, err
        card = json.loads((out / "training_card.json").read_text())
        assert card["objective"]["depth_sampling"] == (flag == "--depth-sampling")
        positions[flag] = card["training"]["positions"]
    weights = card["objective"]["depth_weights"]
    share = positions["--depth-sampling"] / positions["--no-depth-sampling"]
    assert positions["--no-depth-sampling"] > 500
    assert share == pytest.approx(sum(weights) / len(weights), abs=0.08)


def test_card_reports_where_generation_time_went(trained):
    gen = json.loads((trained / "training_card.json").read_text())["data"]["generation"]
    assert gen["prompts"] == 24 and gen["new_tokens"] > 0
    assert gen["prefill_tokens"] > 0 and 0 < gen["prefill_s"] <= gen["seconds"] and gen["prefill_packs"] >= 1
    assert gen["decode_steps"] > 0 and gen["batch_rows"] == 8
    assert 0 < gen["tokens_per_step"] <= gen["batch_rows"] and gen["ms_per_step"] > 0


def test_batched_prompt_encoding_equals_one_by_one(tiny):
    from transformers import AutoTokenizer

    from jetspec_trt.datasets import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "target"), local_files_only=True)
    conversations = [[{"role": "user", "content": "sort a list"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello <b> world\n"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "fast rust graph"}]]
    one_by_one = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False, enable_thinking=False))
                  for c in conversations]
    assert encode_prompts(tokenizer, conversations, chunk=2) == one_by_one


def test_prompt_offset_answers_later_prompts(tiny, tmp_path, capsys):
    """--prompt-offset 20 --num-prompts 4: the responses are to prompts 20..23 of the source, in order."""
    from transformers import AutoTokenizer

    from jetspec_trt.datasets import encode_prompts, load_prompt_messages

    out = tmp_path / "offset"
    argv = [a for a in train_args(tiny, out) if a not in ("--num-prompts", "24")]
    argv = argv[: argv.index("--steps")] + ["--steps", "0", "--num-prompts", "4", "--prompt-offset", "20",
                                             "--heldout", "1"]
    code, _, err = invoke(argv, capsys)
    assert code == 0, err
    (cache,) = (out / "data").glob("responses-*.jsonl")
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "target"), local_files_only=True)
    expected = encode_prompts(tokenizer, load_prompt_messages(str(tiny / "prompts.jsonl"), 24)[20:])
    assert [r["prompt_ids"] for r in sorted(rows, key=lambda r: r["index"])] == expected
    empty = tmp_path / "offset-past-the-end"
    argv[argv.index("--output") + 1] = str(empty)
    code, _, err = invoke(argv[:-4] + ["--prompt-offset", "24"], capsys)
    assert code == 2 and "skips every prompt" in err and len(err.strip().splitlines()) == 1
    assert not (empty / "data").exists()  # nothing written for a request that cannot run


def test_vocab_coverage_ranks_on_training_responses_and_counts_held_out_ones():
    from jetspec_trt.train.data import TrainSequence
    from jetspec_trt.train.trainer import response_counts, vocab_coverage

    train = [TrainSequence([1, 2], [5, 5, 5, 6, 6, 7]), TrainSequence([3], [5, 8])]  # rank: 5, 6, then 7/8
    heldout = [TrainSequence([1], [5, 6, 9, 5])]  # 9 never appears in training
    coverage = vocab_coverage(response_counts(train), heldout, sizes=(1, 2, 4))
    assert coverage["distinct_train_response_tokens"] == 4 and coverage["heldout_response_tokens"] == 4
    assert (coverage["1"], coverage["2"], coverage["4"]) == (0.5, 0.75, 0.75)
    assert vocab_coverage(response_counts(train), [], sizes=(2,))["2"] is None


def test_card_reports_response_vocab_coverage_and_the_head_its_token_counts(trained):
    data = json.loads((trained / "training_card.json").read_text())["data"]
    coverage = data["response_vocab_coverage"]
    assert 0 < coverage["4096"] <= coverage["65536"] <= 1 and coverage["heldout_response_tokens"] > 0
    counts = json.loads((trained / "token_counts.json").read_text())
    assert counts["response_tokens"] == sum(counts["counts"].values()) == data["train_response_tokens"]
    assert len(counts["counts"]) == coverage["distinct_train_response_tokens"]
