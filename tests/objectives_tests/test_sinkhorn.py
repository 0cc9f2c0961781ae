"""objectives.sinkhorn_divergence against POT's exact 1-D optimal transport, and its guards."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from objectives import sinkhorn_divergence


def samples(seed: int, case: str) -> tuple[np.ndarray, np.ndarray]:
    """Two score-like sample sets in [0, 1] of different sizes.

    "apart": clearly different distributions; "close": logit-normal scores half a logit apart,
    the small-divergence regime a fairness loss works in, where Sinkhorn's error is largest.
    """
    rng = np.random.default_rng(seed)
    if case == "apart":
        return rng.beta(2, 5, 80), rng.beta(5, 2, 120)
    if case == "shifted":
        return rng.beta(2, 2, 80), np.clip(rng.beta(2, 2, 120) + 0.15, 0, 1)
    return 1 / (1 + np.exp(-rng.normal(0, 1.5, 64))), 1 / (1 + np.exp(-rng.normal(0.5, 1.5, 100)))


def relative_error(x: np.ndarray, y: np.ndarray, *, scaling: float, p: int = 2) -> float:
    exact = ot.wasserstein_1d(x, y, p=p) / (2 if p == 2 else 1)  # geomloss cost is |x-y|^2 / 2
    value = sinkhorn_divergence(torch.tensor(x), torch.tensor(y), blur=1e-3, scaling=scaling, p=p)
    return (value.item() - exact) / exact


# Measured on these seeds (scaling=0.9, blur=1e-3): apart <= 0.12%, shifted <= 0.36%, close <= 3.5%,
# always an under-estimate (over 10 seeds "close" reached 7%). Tolerances: ~2x the worst seed here.
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("case", "rtol"), [("apart", 0.005), ("shifted", 0.01), ("close", 0.07)])
def test_matches_exact_1d_ot_at_small_blur(seed: int, case: str, rtol: float) -> None:
    assert abs(relative_error(*samples(seed, case), scaling=0.9)) < rtol


@pytest.mark.parametrize("case", ["apart", "shifted", "close"])
def test_geomloss_default_scaling_is_worse(case: str) -> None:
    """Why scaling defaults to 0.9: geomloss's 0.5 stops annealing too early.

    Measured mean |relative error| over these 4 seeds, 0.5 vs 0.9: apart 0.9% vs 0.1%, shifted
    3.0% vs 0.2%, close 13.7% vs 2.0% (over 10 seeds the worst "close" case: 49% vs 7%). Both
    under-estimate. Only the ordering is asserted.
    """
    err = {s: np.mean([abs(relative_error(*samples(seed, case), scaling=s)) for seed in range(4)]) for s in (0.5, 0.9)}
    assert err[0.5] > 2 * err[0.9]


def test_p1_matches_exact_w1() -> None:
    x, y = samples(0, "apart")
    assert abs(relative_error(x, y, scaling=0.9, p=1)) < 0.03


@pytest.mark.parametrize("constant", [False, True])
def test_identical_inputs_give_zero(constant: bool) -> None:
    """Identical inputs crash geomloss without a diameter (log 0); constant ones have range 0."""
    x = torch.full((16,), 0.7) if constant else torch.rand(16, generator=torch.Generator().manual_seed(0))
    value = sinkhorn_divergence(x, x.clone(), blur=1e-3)
    assert torch.isfinite(value) and abs(value.item()) < 1e-6


@pytest.mark.parametrize("blur", [1e-2, 1e-3, 1e-4])
def test_gradients_flow_and_are_finite(blur: float) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(32, generator=gen, requires_grad=True)
    y = (torch.rand(48, generator=gen) * 0.5 + 0.5).requires_grad_()
    sinkhorn_divergence(x, y, blur=blur).backward()
    for grad in (x.grad, y.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Moving x towards y lowers the divergence: the x gradient points away from y (negative).
    assert (x.grad < 0).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    x, y = (torch.tensor(a) for a in samples(2, "apart"))
    reference = sinkhorn_divergence(x.float(), y.float(), blur=1e-3)
    value = sinkhorn_divergence(x.to(dtype), y.to(dtype), blur=1e-3)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(reference.item(), rel=0.02)  # input rounding only


def test_autocast_region_does_not_lower_precision() -> None:
    x, y = (torch.tensor(a, dtype=torch.float32) for a in samples(3, "close"))
    reference = sinkhorn_divergence(x, y, blur=1e-3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = sinkhorn_divergence(x, y, blur=1e-3)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(reference.item(), rel=1e-6)


def test_column_vectors_accepted() -> None:
    x, y = (torch.tensor(a, dtype=torch.float32) for a in samples(0, "apart"))
    assert sinkhorn_divergence(x[:, None], y[:, None], blur=1e-2).item() == pytest.approx(
        sinkhorn_divergence(x, y, blur=1e-2).item()
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"x": torch.rand(4, 2)}, "x"),
        ({"y": torch.rand(0)}, "y"),
        ({"x": np.zeros(4)}, "x"),
        ({"blur": 0.0}, "blur"),
        ({"blur": float("nan")}, "blur"),
        ({"scaling": 1.0}, "scaling"),
        ({"p": 3}, "p"),
        ({"diameter": -1.0}, "diameter"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, name: str) -> None:
    args = {"x": torch.rand(4), "y": torch.rand(5), "blur": 1e-2, **kwargs}
    with pytest.raises(ValueError, match=name):
        sinkhorn_divergence(args.pop("x"), args.pop("y"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x, y = (torch.tensor(a, dtype=torch.float32) for a in samples(1, "shifted"))
    on_cpu = sinkhorn_divergence(x, y, blur=1e-3)
    with torch.autocast(device_type="cuda", dtype=torch.float16):
        on_gpu = sinkhorn_divergence(x.cuda().half(), y.cuda().half(), blur=1e-3)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert on_gpu.item() == pytest.approx(on_cpu.item(), rel=0.02)
