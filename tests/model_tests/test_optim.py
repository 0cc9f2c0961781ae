"""Learning-rate schedule and optimizer choices."""

import math

import pytest
import torch

from model.config import TrainingConfig
from model.optim import build_optimizer, lr_factor


def test_warmup_is_linear_then_cosine_restarts_follow_t0_and_tmult():
    cfg = TrainingConfig(warmup_epochs=2, num_epochs=30, T_0=5, T_mult=2, min_lr=0.0, lr=1e-3)
    assert lr_factor(1.0, cfg) == pytest.approx(0.5)
    assert lr_factor(2.0, cfg) == pytest.approx(1.0)  # first cycle starts after warmup
    assert lr_factor(2 + 2.5, cfg) == pytest.approx(0.5)  # half-way through a 5-epoch cycle
    assert lr_factor(2 + 5, cfg) == pytest.approx(1.0)  # restart
    assert lr_factor(2 + 5 + 5, cfg) == pytest.approx(0.5)  # half-way through the 10-epoch cycle
    assert lr_factor(2 + 15, cfg) == pytest.approx(1.0)


def test_plain_cosine_ends_at_min_lr():
    cfg = TrainingConfig(warmup_epochs=0, num_epochs=10, scheduler="cosine", lr=1e-3, min_lr=1e-5)
    assert lr_factor(0.0, cfg) == pytest.approx(1.0)
    assert lr_factor(10.0, cfg) == pytest.approx(1e-2)
    assert lr_factor(5.0, cfg) == pytest.approx(0.5 * (1 + 1e-2))


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD), ("radam", torch.optim.RAdam)])
def test_optimizer_choice_and_differential_lr(name, cls):
    adapter, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    cfg = TrainingConfig(optimizer=name, lr=1e-3, head_lr_mult=10.0, weight_decay=0.05)
    opt = build_optimizer({"adapter": list(adapter.parameters()), "head": list(head.parameters())}, cfg)
    assert isinstance(opt, cls)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [pytest.approx(1e-3), pytest.approx(1e-2)]
    # weight decay only on matrices, never on biases
    for group in opt.param_groups:
        assert group["weight_decay"] == (0.05 if all(p.ndim >= 2 for p in group["params"]) else 0.0)
    assert not math.isnan(lrs[0])


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD), ("radam", torch.optim.RAdam)])
def test_updates_equal_torchs_plain_for_loop_optimizer(name, cls):
    """build_optimizer picks torch's fused (or foreach) kernels for speed; the updates must be the
    ones of torch's reference single-tensor implementation (foreach=False), step after step."""
    torch.manual_seed(0)
    adapter, head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    cfg = TrainingConfig(optimizer=name, lr=1e-2, head_lr_mult=3.0, weight_decay=0.05, momentum=0.9)
    params = [*adapter.parameters(), *head.parameters()]
    start = [p.detach().clone() for p in params]
    reference_params = [torch.nn.Parameter(p.clone()) for p in start]
    fast = build_optimizer({"adapter": params[:2], "head": params[2:]}, cfg)
    index = {id(p): i for i, p in enumerate(params)}
    reference = cls([{"params": [reference_params[index[id(p)]] for p in g["params"]], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                     for g in fast.param_groups], **({"momentum": 0.9} if name == "sgd" else {}), foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, reference_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fast.step()
        reference.step()
    for p, q in zip(params, reference_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(p.detach(), p0) for p, p0 in zip(params, start))  # every tensor moved
