"""Debiased Sinkhorn divergence between 1-D sample sets, made safe for training-loop use.

geomloss's ``SamplesLoss("sinkhorn", p=2, ...)`` with three guards it lacks for our case:

- float32 always, with autocast switched off: float16 overflows in the cost/exp, and under a
  CUDA autocast region geomloss's matmul-based squared distance would silently run in half.
- The cost is the exact pairwise ``(x_i - y_j)^2 / 2`` (geomloss's convention for p=2) instead
  of geomloss's ``|x|^2 + |y|^2 - 2 x.y``; same value, no cancellation, no matmul to autocast.
- ``diameter``: geomloss's epsilon-scaling schedule starts at ``diameter^p`` and takes its log,
  so identical inputs (diameter 0) crash it. We pass ``max(range of x and y, blur)``.

``scaling`` is the ratio between successive blur values of that schedule, i.e. the number of
Sinkhorn iterations: geomloss's default 0.5 under-estimates 1-D OT badly for close distributions
(the regime a fairness loss lives in); 0.9 is our default (see tests/objectives_tests).
"""

from __future__ import annotations

import math

import torch
from geomloss import SamplesLoss


def _half_squared_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C(x_i, y_j) = |x_i - y_j|^2 / 2 for batched clouds (B, N, D), (B, M, D) -> (B, N, M)."""
    return ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1) / 2


def check_blur_scaling(blur: float, scaling: float) -> None:
    """Validate the two Sinkhorn hyperparameters the search samples."""
    if not (isinstance(blur, (int, float)) and math.isfinite(blur) and blur > 0):
        raise ValueError(f"blur must be a positive finite number, got {blur!r}")
    if not (isinstance(scaling, (int, float)) and 0.0 < scaling < 1.0):
        raise ValueError(f"scaling must be in (0, 1), got {scaling!r}")


def sinkhorn_loss(*, blur: float, scaling: float, p: int, diameter: float) -> SamplesLoss:
    """The geomloss loss object behind ``sinkhorn_divergence``, called as ``loss(x, y)`` with
    (N, 1), (M, 1) clouds. (``fairness_loss`` solves its many small problems in one packed loop
    with geomloss' schedule instead: objectives/_sinkhorn_packed.py.)
    """
    return SamplesLoss(
        "sinkhorn",
        p=p,
        blur=blur,
        scaling=scaling,
        debias=True,
        diameter=diameter,
        backend="tensorized",  # no pykeops needed; memory N*M per pair, fine for batches
        cost=_half_squared_distance if p == 2 else None,
    )


def sinkhorn_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    blur: float,
    scaling: float = 0.9,
    p: int = 2,
    diameter: float | None = None,
) -> torch.Tensor:
    """Debiased Sinkhorn divergence S_eps(x, y) between two 1-D empirical distributions.

    With p=2 the ground cost is |x - y|^2 / 2, so for small ``blur`` the value approaches half the
    squared 2-Wasserstein distance (``ot.wasserstein_1d(x, y, p=2) / 2``). Both inputs get uniform
    weights. Gradients flow to both inputs.

    Args:
        x: samples of shape [n] (or [n, 1]).
        y: samples of shape [m] (or [m, 1]).
        blur: entropic blur; epsilon = blur**p.
        scaling: epsilon-scaling ratio in (0, 1); closer to 1 = more iterations, more accurate.
        p: exponent of the ground cost (1 or 2).
        diameter: upper bound on |x_i - y_j|; None = the data's range (at least ``blur``).

    Returns:
        A float32 scalar tensor on the inputs' device.
    """
    check_blur_scaling(blur, scaling)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    points = []
    for name, values in (("x", x), ("y", y)):
        if not isinstance(values, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
        if values.dim() == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.dim() != 1 or values.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor of shape [n], got {tuple(values.shape)}")
        points.append(values.float()[:, None])
    x2, y2 = points
    if diameter is None:
        with torch.no_grad():
            both = torch.cat([x2.detach(), y2.detach()])
            diameter = float(both.max() - both.min())  # one device sync, as geomloss itself does
        if not math.isfinite(diameter):
            raise ValueError("x and y must be finite")
        diameter = max(diameter, float(blur))
    elif not (math.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be positive and finite, got {diameter!r}")
    loss = sinkhorn_loss(blur=blur, scaling=scaling, p=p, diameter=diameter)
    with torch.autocast(device_type=x2.device.type, enabled=False):
        return loss(x2, y2)
