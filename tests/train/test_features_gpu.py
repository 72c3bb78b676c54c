"""On CUDA: the packed feature pass (Triton tree-attention kernel with a block-diagonal causal mask of up to a few
thousand tokens) equals per-sequence passes up to bf16 rounding."""

import pytest
import torch

from jetspec_trt.models.presets import random_models
from jetspec_trt.plugins.tree_attention import load_gpu_kernels
from jetspec_trt.train.data import TrainSequence
from jetspec_trt.train.features import FeatureStore

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_feature_pass_matches_per_sequence_on_cuda(dtype):
    assert load_gpu_kernels()
    target, _, _ = random_models("tiny", "cuda", dtype)
    gen = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(5, 700, (24,), generator=gen)]
    seqs = [TrainSequence(s[:3].tolist(), s[3:].tolist())
            for s in (torch.randint(0, 256, (n,), generator=gen) for n in lengths)]
    alone = FeatureStore.build(target, seqs, (0, 1), progress=False)
    packed = FeatureStore.build(target, seqs, (0, 1), progress=False, pack_tokens=4096)
    for got, ref in ((packed.features, alone.features), (packed.final_hidden, alone.final_hidden)):
        err = (got.float() - ref.float()).norm() / ref.float().norm()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), float(err)


def test_host_store_gathers_what_the_device_store_holds():
    """A store in pinned host memory (too big for the GPU) hands a step the same rows as one on the device."""
    target, _, _ = random_models("tiny", "cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(5, 300, (10,), generator=gen)]
    seqs = [TrainSequence(s[:3].tolist(), s[3:].tolist())
            for s in (torch.randint(0, 256, (n,), generator=gen) for n in lengths)]
    on_device = FeatureStore.build(target, seqs, (0, 1), progress=False, pack_tokens=4096, where="device")
    on_host = FeatureStore.build(target, seqs, (0, 1), progress=False, pack_tokens=4096, where="host")
    assert on_device.features.is_cuda and on_host.features.device.type == "cpu" and on_host.features.is_pinned()
    assert on_host.offsets.is_cuda  # only the big tables move
    rows = [7, 2, 9]
    assert torch.equal(on_host.padded_features(rows), on_device.padded_features(rows))
    index = torch.tensor([0, 5, 17, 40], device="cuda")
    assert torch.equal(on_host.final_hidden_rows(index), on_device.final_hidden_rows(index))


def test_feature_pass_loads_the_kernel_itself():
    """A fresh process that builds features and nothing else (the training command on the device) runs the packed
    pass on the Triton kernel: the reference attends the whole cache densely (2026-12-04: 346 s for 10.9 M tokens)."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from jetspec_trt.models.presets import random_models\n"
        "from jetspec_trt.plugins import triton_tree_attention as tta\n"
        "from jetspec_trt.train.data import TrainSequence\n"
        "from jetspec_trt.train.features import FeatureStore\n"
        "target, _, _ = random_models('tiny', 'cuda', torch.bfloat16)\n"
        "assert not tta._REGISTERED\n"
        "FeatureStore.build(target, [TrainSequence([1, 2, 3], [4, 5])] * 3, (0, 1), progress=False, pack_tokens=64)\n"
        "print('registered', tta._REGISTERED)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registered True" in out.stdout


@pytest.mark.parametrize("where", ["device", "host"])
def test_step_rows_never_waits_for_the_device(where):
    """A step's indices are built on the host and copied without blocking: under CUDA's sync debug mode "error",
    step_rows (anchors, depth sampling, features, labels, row indices) makes the host wait for nothing."""
    from jetspec_trt.train.head import new_head
    from jetspec_trt.train.trainer import Trainer, TrainConfig

    target, _, _ = random_models("tiny", "cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    seqs = [TrainSequence(s[:3].tolist(), s[3:].tolist())
            for s in (torch.randint(0, 256, (n,), generator=gen) for n in (40, 70, 25))]
    head = new_head(target, 1, 8, (0,), 255, gen).cuda().train()
    cfg = TrainConfig("t", "o", batch_size=3, block_size=8, anchors_per_seq=16, anchor_group=4, heldout=0,
                      feature_store=where, progress=False)
    trainer = Trainer(cfg, target, head, seqs, [], gen, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = trainer.step_rows([0, 1, 2], 16, gen, sample_depths=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rows.hidden_index.is_cuda and rows.batch.features.is_cuda and rows.labels.shape == rows.depth.shape


def test_losses_reach_the_host_a_step_late_and_all_of_them():
    """On a GPU a step's loss is read at the end of the next step (the device keeps a step queued meanwhile):
    train_step returns the previous step's loss, and payload() / flush_losses() collect every step's."""
    from jetspec_trt.train.head import new_head
    from jetspec_trt.train.trainer import Trainer, TrainConfig

    target, _, _ = random_models("tiny", "cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    seqs = [TrainSequence(s[:3].tolist(), s[3:].tolist())
            for s in (torch.randint(0, 256, (n,), generator=gen) for n in (40, 70, 25))]
    head = new_head(target, 1, 8, (0,), 255, gen).cuda().train()
    cfg = TrainConfig("t", "o", batch_size=2, block_size=8, anchors_per_seq=16, heldout=0, progress=False)
    trainer = Trainer(cfg, target, head, seqs, [], gen, "cuda")
    returned = [trainer.train_step() for _ in range(3)]
    assert returned[0] is None and len(trainer.losses) == 2 and returned[1:] == trainer.losses
    assert len(trainer.payload()["losses"]) == 3 and all(x == x for x in trainer.losses)  # none lost, none NaN
