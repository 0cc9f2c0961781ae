"""``evaluate``: detection and group-fairness metrics of one scored set, in one place.

Fairness gaps are computed from per-group rates. A group with no real samples has no FPR: it is
left out of every FPR-based term and named in ``groups_without_real``. The public reference code
counts such a group as FPR 0 instead, which inflates F_FPR by the overall FPR for each such group
(and can inflate F_MEO); the left-out groups are reported so a reader can see why numbers differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from objectives._detection import detection_metrics
from objectives._inputs import (
    as_python,
    check_groups,
    check_labels,
    check_same_length,
    check_scores,
    check_threshold,
)

METRIC_NAMES: tuple[str, ...] = ("auc", "acc", "eer", "ap", "f_fpr", "f_oae", "f_dp", "f_meo")
"""The metric keys of ``evaluate``, in report order (the search config refers to these names)."""

THRESHOLD_FREE: tuple[str, ...] = ("auc", "eer", "ap")
"""The metrics of the scores alone: a tuned decision threshold changes every other one."""

METRIC_DIRECTIONS: dict[str, str] = {
    "auc": "maximize",
    "acc": "maximize",
    "eer": "minimize",
    "ap": "maximize",
    "f_fpr": "minimize",
    "f_oae": "minimize",
    "f_dp": "minimize",
    "f_meo": "minimize",
}
"""Optimisation direction of each metric, in Optuna's spelling (a plain dict: YAML/JSON-dumpable)."""


@dataclasses.dataclass(frozen=True)
class GroupRates:
    """Counts and rates of one group. ``fpr`` is NaN without real samples, ``tpr`` without fakes."""

    n: int
    n_real: int
    n_fake: int
    fpr: float
    tpr: float
    acc: float
    pr: float  # predicted-fake share (selection rate), what demographic parity compares


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """All metrics of one evaluated set, plus the per-group rates they were computed from.

    ``groups`` is a plain dict (so an Evaluation pickles across worker processes); treat it as
    read-only. Group keys are plain Python values in sorted order.
    """

    auc: float
    acc: float
    eer: float
    ap: float
    f_fpr: float
    f_oae: float
    f_dp: float
    f_meo: float
    threshold: float
    groups: Mapping[Hashable, GroupRates]
    groups_without_real: tuple[Hashable, ...]
    groups_without_fake: tuple[Hashable, ...]

    @property
    def n_groups(self) -> int:
        """Groups present in the evaluated set (F_OAE and F_DP span these)."""
        return len(self.groups)

    @property
    def n_groups_fpr(self) -> int:
        """Groups with at least one real sample (F_FPR and the FPR side of F_MEO span these)."""
        return self.n_groups - len(self.groups_without_real)

    @property
    def n_groups_tpr(self) -> int:
        """Groups with at least one fake sample (the TPR side of F_MEO spans these)."""
        return self.n_groups - len(self.groups_without_fake)

    def as_dict(self) -> dict[str, float]:
        """The eight metrics plus the three group counts, as plain Python numbers."""
        values: dict[str, float] = {name: getattr(self, name) for name in METRIC_NAMES}
        values.update(n_groups=self.n_groups, n_groups_fpr=self.n_groups_fpr, n_groups_tpr=self.n_groups_tpr)
        return values


def _spread(values: list[float]) -> float:
    """max - min, and 0.0 when fewer than two groups take part (no gap to measure)."""
    return float(max(values) - min(values)) if len(values) >= 2 else 0.0


def _group_rates(labels: np.ndarray, predicted: np.ndarray) -> GroupRates:
    real, fake = labels == 0, labels == 1
    n_real, n_fake = int(real.sum()), int(fake.sum())
    return GroupRates(
        n=int(labels.size),
        n_real=n_real,
        n_fake=n_fake,
        fpr=float(predicted[real].mean()) if n_real else float("nan"),
        tpr=float(predicted[fake].mean()) if n_fake else float("nan"),
        acc=float(np.mean(predicted == labels)),
        pr=float(predicted.mean()),
    )


def evaluate_detailed(y_true: Any, y_score: Any, groups: Any, threshold: float = 0.5) -> Evaluation:
    """Detection and fairness metrics of scores ``y_score`` (probabilities) for labels ``y_true``.

    Args:
        y_true: 0/1 labels, 1 = fake. Both classes must be present (AUC is undefined otherwise).
        y_score: probabilities in [0, 1] (sigmoid outputs); predicted fake = score >= threshold.
        groups: one hashable demographic group label per sample (ints or strings).
        threshold: decision threshold for ACC and all group rates.

    Returns:
        An ``Evaluation`` with the eight metrics (fractions, not %), the per-group rates and the
        groups left out of FPR-based (no real sample) and TPR-based (no fake sample) terms.
    """
    labels, scores, group_labels = check_labels(y_true), check_scores(y_score), check_groups(groups)
    check_same_length(y_true=labels, y_score=scores, groups=group_labels)
    threshold = check_threshold(threshold)
    if labels.min() == labels.max():
        kind = "fake" if labels[0] == 1 else "real"
        raise ValueError(f"y_true has only {kind} samples: AUC, EER and overall FPR/TPR are undefined")

    predicted = (scores >= threshold).astype(np.int64)
    detection = detection_metrics(labels, scores, predicted)

    unique, inverse = np.unique(group_labels, return_inverse=True)
    rates = {as_python(g): _group_rates(labels[inverse == i], predicted[inverse == i]) for i, g in enumerate(unique)}
    with_real = {g: r for g, r in rates.items() if r.n_real}
    with_fake = {g: r for g, r in rates.items() if r.n_fake}

    overall_fpr = float(predicted[labels == 0].mean())
    fpr_spread = _spread([r.fpr for r in with_real.values()])
    tpr_spread = _spread([r.tpr for r in with_fake.values()])
    return Evaluation(
        **detection,
        f_fpr=float(sum(abs(r.fpr - overall_fpr) for r in with_real.values())),
        f_oae=_spread([r.acc for r in rates.values()]),
        f_dp=_spread([r.pr for r in rates.values()]),
        # TNR = 1 - FPR and FNR = 1 - TPR have the same spreads, so the max of four is a max of two.
        f_meo=max(fpr_spread, tpr_spread),
        threshold=threshold,
        groups=rates,
        groups_without_real=tuple(g for g in rates if g not in with_real),
        groups_without_fake=tuple(g for g in rates if g not in with_fake),
    )


def evaluate(y_true: Any, y_score: Any, groups: Any, threshold: float = 0.5) -> dict[str, float]:
    """``evaluate_detailed(...).as_dict()``: the eight metrics and the group counts, for logging.

    Keys: auc, acc, eer, ap, f_fpr, f_oae, f_dp, f_meo, n_groups, n_groups_fpr, n_groups_tpr.
    """
    return evaluate_detailed(y_true, y_score, groups, threshold).as_dict()
