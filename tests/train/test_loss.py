"""The chunked head loss equals the plain full-logits loss (value and gradient), depth weights follow
exp(-(k-1)/gamma), liger's fused path agrees on the GPU, and a grown head starts as the head it grew from."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jetspec_trt.train.loss import LossConfig, chunked_argmax, depth_weights, head_loss, liger_available

V, H, D = 300, 24, 7


def reference_loss(hidden, weight, depth, weights, labels, teacher, cfg):
    logits = (hidden @ weight.T).float()
    if cfg.kind == "ce":
        rows = F.cross_entropy(logits, labels, reduction="none")
    else:
        target = F.log_softmax((teacher @ weight.T).float() / cfg.temperature, -1)
        rows = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="none").sum(-1)
    w = weights[depth]
    return (rows * w).sum() / w.sum()


def inputs(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.3
    depth = torch.randint(0, D, (rows,), generator=gen)
    labels = torch.randint(0, V, (rows,), generator=gen)
    teacher = torch.randn(rows, H, generator=gen, dtype=torch.float64)
    return hidden, weight, depth, labels, teacher


def test_depth_weights():
    w = depth_weights(15, 7.0)
    assert w[0] == 1.0 and w[7].item() == pytest.approx(math.exp(-1.0)) and w[14].item() == pytest.approx(math.exp(-2.0))
    assert torch.equal(depth_weights(4, None), torch.ones(4))


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("gamma", [None, 3.0])
def test_chunked_loss_equals_full_logits(kind, gamma):
    hidden, weight, depth, labels, teacher = inputs(101, seed=1 if kind == "ce" else 2)
    cfg = LossConfig(kind, temperature=0.7, decay_gamma=gamma, chunk_rows=16)  # 7 chunks, the last partial
    weights = depth_weights(D, gamma).double()
    a = hidden.clone().requires_grad_(True)
    got = head_loss(a, weight, depth, weights, labels, teacher if kind == "kl" else None, cfg)
    got.backward()
    b = hidden.clone().requires_grad_(True)
    want = reference_loss(b, weight, depth, weights, labels, teacher, cfg)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9)
    # the weights matter: uniform weights give another value when gamma is set
    if gamma is not None:
        uniform = head_loss(hidden, weight, depth, torch.ones(D, dtype=torch.float64), labels,
                            teacher if kind == "kl" else None, cfg)
        assert abs(uniform.item() - want.item()) > 1e-6


def test_kl_needs_teacher_and_config_is_checked():
    hidden, weight, depth, labels, _ = inputs(5, seed=3)
    with pytest.raises(ValueError):
        head_loss(hidden, weight, depth, depth_weights(D, None), labels, None, LossConfig("kl"))
    from jetspec_trt.errors import JetSpecError

    for bad in (LossConfig("mse"), LossConfig(decay_gamma=-1.0), LossConfig("kl", backend="liger"),
                LossConfig(temperature=0.0)):
        with pytest.raises(JetSpecError):
            bad.validate()


def test_chunked_argmax():
    hidden, weight, *_ = inputs(50, seed=4)
    assert torch.equal(chunked_argmax(hidden, weight, chunk_rows=7), (hidden @ weight.T).argmax(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gamma", [7.0, None])  # None: equal weights, liger's one-call path (depth sampling)
def test_liger_backend_matches_torch_on_gpu(gamma):
    if not liger_available():
        pytest.skip("liger-kernel is not installed")
    gen = torch.Generator().manual_seed(5)
    rows, vocab, hidden_size = 3000, 151936, 896
    hidden = (torch.randn(rows, hidden_size, generator=gen) * 2).cuda().bfloat16()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).cuda().bfloat16()
    depth = torch.randint(0, 15, (rows,), generator=gen).cuda()
    labels = torch.randint(0, vocab, (rows,), generator=gen).cuda()
    weights = depth_weights(15, gamma).cuda()
    grads = {}
    values = {}
    for backend in ("torch", "liger"):
        h = hidden.clone().requires_grad_(True)
        loss = head_loss(h, weight, depth, weights, labels, None, LossConfig(chunk_rows=1024), backend)
        loss.backward()
        values[backend], grads[backend] = loss.item(), h.grad.float()
    assert values["liger"] == pytest.approx(values["torch"], rel=2e-3)
    err = (grads["liger"] - grads["torch"]).norm() / grads["torch"].norm()
    assert err < 2e-2, err
