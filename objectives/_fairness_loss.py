"""The label-conditioned fairness loss: how far each group's score distribution is from the batch's.

For each label c (real, fake) and each group g with at least ``min_group_size`` samples of label c,
the debiased Sinkhorn divergence between the scores of (c, g) and the scores of all label-c samples
in the batch; the loss is the mean over those (label, group) pairs. Conditioning on the label is
what F_FPR / F_MEO measure: real faces of every group should score alike, fakes likewise. Without
it, a group with more fakes in the batch would be pushed towards looking real.

All pairs (and, with ``fairness_loss_multi``, all trials of a fused group) go through one packed
Sinkhorn loop (objectives/_sinkhorn_packed.py: geomloss' schedule and updates, a few kernels per
iteration instead of geomloss' per-problem calls). Each cloud is padded to the longest with
zero-weight copies of its own first point (a copy carries the same dual potential, so geomloss'
finite "log 0" of -1e5 cannot let it leak in even at tiny blur), and padded values are detached
so they receive no gradient. The pair bookkeeping runs on the CPU (labels and groups are tiny).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from objectives._sinkhorn import check_blur_scaling
from objectives._sinkhorn_packed import debiased_sinkhorn_1d, schedule

__all__ = ["compile_fairness_loss", "fairness_loss", "fairness_loss_multi"]

_DIAMETER = 1.0  # scores are probabilities: no two differ by more than 1


def _as_1d(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 2 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.dim() != 1:
        raise ValueError(f"{name} must have shape [n] or [n, 1], got {tuple(tensor.shape)}")
    return tensor


def _pairs(labels: torch.Tensor, groups: torch.Tensor, min_group_size: int) -> tuple[list[torch.Tensor], list[int], list[torch.Tensor]]:
    """(members, set_of_pair, sets): the indices of every qualifying (c, g) pair, the label set each
    pair is compared with, and the label sets (indices of all label-c samples; one per label present
    in a pair, shared by all its groups)."""
    members, set_of_pair, sets = [], [], []
    for c in (0, 1):
        same_label = torch.nonzero(labels == c).flatten()
        if same_label.numel() == 0:
            continue
        ids, counts = torch.unique(groups[same_label], return_counts=True)
        qualifying = [g for g, count in zip(ids.tolist(), counts.tolist()) if count >= min_group_size]
        if qualifying:
            members += [same_label[groups[same_label] == g] for g in qualifying]
            set_of_pair += [len(sets)] * len(qualifying)
            sets.append(same_label)
    return members, set_of_pair, sets


def _padded(index_sets: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, length) indices padded with each set's first index, and (S, length) uniform weights (0 on pads)."""
    index = torch.stack([torch.cat([s, s[:1].expand(length - s.numel())]) for s in index_sets])
    weight = torch.zeros(index.shape, dtype=torch.float32)
    for row, s in enumerate(index_sets):
        weight[row, : s.numel()] = 1.0 / s.numel()
    return index, weight


def _checked_batch(labels, groups, n: int, min_group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and groups as CPU long tensors of length n, or ValueError naming the argument."""
    if isinstance(min_group_size, bool) or not isinstance(min_group_size, int) or min_group_size < 1:
        raise ValueError(f"min_group_size must be an integer >= 1, got {min_group_size!r}")
    labels_cpu = _as_1d(labels, "labels").detach().cpu()
    groups_cpu = _as_1d(groups, "groups").detach().cpu()
    if groups_cpu.is_floating_point() or groups_cpu.is_complex() or groups_cpu.dtype == torch.bool:
        raise ValueError(f"groups must be an integer tensor of group ids, got {groups_cpu.dtype}")
    if not (labels_cpu.numel() == groups_cpu.numel() == n):
        raise ValueError(f"length mismatch: scores={n}, labels={labels_cpu.numel()}, groups={groups_cpu.numel()}")
    if not torch.isin(labels_cpu, torch.tensor([0, 1], dtype=labels_cpu.dtype)).all():
        raise ValueError("labels must contain only 0 (real) and 1 (fake)")
    return labels_cpu.long(), groups_cpu.long()


def fairness_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    *,
    blur: float,
    scaling: float = 0.9,
    min_group_size: int = 2,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean debiased Sinkhorn divergence between each (label, group)'s scores and its label's scores.

    Args:
        scores: probabilities in [0, 1] (sigmoid outputs), shape [n] or [n, 1]; any float dtype
            (computed in float32).
        labels: 0/1 labels (1 = fake), shape [n]; integer, bool or float holding 0/1.
        groups: integer group ids, shape [n].
        blur: Sinkhorn blur (epsilon = blur**2); the search samples it on a log scale.
        scaling: epsilon-scaling ratio in (0, 1); see ``sinkhorn_divergence``.
        min_group_size: a (label, group) pair needs this many samples in the batch to take part;
            smaller ones give too noisy a distribution to compare.
        compiled: run the Sinkhorn iterations through ``torch.compile`` (the training setting
            ``compile_sinkhorn``; objectives/_sinkhorn_packed.py says what it changes).

    Returns:
        A float32 scalar on ``scores``' device. If no pair qualifies, ``scores.sum() * 0``: zero but
        still part of the graph, so ``backward()`` on a total loss keeps working.
    """
    scores = _as_1d(scores, "scores")
    return fairness_loss_multi(scores[None], labels, groups, blurs=[blur], scalings=[scaling], min_group_size=min_group_size,
                               compiled=compiled)[0]


def fairness_loss_multi(
    scores: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    *,
    blurs: Sequence[float],
    scalings: Sequence[float],
    min_group_size: int = 2,
    compiled: bool = False,
) -> torch.Tensor:
    """``fairness_loss`` of T score vectors on the same batch at once: scores [T, n] -> [T].

    Row t is ``fairness_loss(scores[t], labels, groups, blur=blurs[t], scaling=scalings[t])``, up
    to float rounding, gradient included: the T trials of a fused group (model/fused.py) share the
    batch's labels and groups, and all their Sinkhorn problems share one packed loop.
    """
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [trials, n], got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    trials, n = scores.shape
    blurs, scalings = list(blurs), list(scalings)
    if not (len(blurs) == len(scalings) == trials):
        raise ValueError(f"need one blur and one scaling per row of scores ({trials}), got {len(blurs)} and {len(scalings)}")
    for blur, scaling in zip(blurs, scalings):
        check_blur_scaling(blur, scaling)
    labels_cpu, groups_cpu = _checked_batch(labels, groups, n, min_group_size)

    scores32 = scores.float()
    members, set_of_pair, sets = _pairs(labels_cpu, groups_cpu, min_group_size)
    if not members:
        return scores32.sum(1) * 0
    n_pairs, n_sets = len(members), len(sets)
    length = max(int(s.numel()) for s in sets)  # a group's members are part of its label's set
    device = scores.device
    x_index, x_weight = (t.to(device, non_blocking=True) for t in _padded(members, length))
    y_index, y_weight = (t.to(device, non_blocking=True) for t in _padded(sets, length))
    # problems and sets of trial t are rows t * n_pairs ... and t * n_sets ...
    set_of_problem = (torch.tensor(set_of_pair)[None, :] + n_sets * torch.arange(trials)[:, None]).flatten()

    def cloud(index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        values = scores32[:, index]  # [T, rows, length]; pads carry no gradient
        return torch.where(weight > 0, values, values.detach()).flatten(0, 1)

    with torch.autocast(device_type=device.type, enabled=False):
        per_pair = debiased_sinkhorn_1d(
            cloud(x_index, x_weight), x_weight.repeat(trials, 1), cloud(y_index, y_weight), y_weight.repeat(trials, 1),
            set_of_problem.to(device, non_blocking=True),
            schedules=[schedule(diameter=_DIAMETER, blur=b, scaling=s) for b, s in zip(blurs, scalings)],
            problem_schedule=torch.arange(trials).repeat_interleave(n_pairs),
            set_schedule=torch.arange(trials).repeat_interleave(n_sets),
            compiled=compiled,
        )
    return per_pair.view(trials, n_pairs).mean(1)


def compile_fairness_loss(device: torch.device | str) -> None:
    """Compile the Sinkhorn iterations of ``compiled=True`` for ``device`` now, on a tiny batch.

    A run calls it before its first step so that a machine where torch.compile cannot work (no C
    compiler for inductor, no Triton) fails at once with torch's reason; the compiled code then
    serves every batch size (dynamic shapes), so the first real step compiles nothing more.
    """
    scores = torch.linspace(0.1, 0.9, 8, device=device)
    labels, groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    fairness_loss(scores, labels, groups, blur=0.1, scaling=0.5, compiled=True)
