"""Metrics and losses of the AUC/fairness trade-off: arrays and tensors in, numbers and losses out.

Pure by design (see DESIGN.md, "Who may import whom"): depends on torch, numpy, scikit-learn and
geomloss only, never on the rest of fairfront.

- ``evaluate`` / ``evaluate_detailed``: AUC, ACC, EER, AP and the group-fairness gaps F_FPR,
  F_OAE, F_DP, F_MEO of one scored set.
- ``sinkhorn_divergence``: debiased Sinkhorn divergence between two 1-D sample sets.
- ``fairness_loss``: the label-conditioned, group-vs-batch Sinkhorn fairness term of training;
  ``fairness_loss_multi``: the same for T score vectors of one batch (fused trials) at once;
  ``compile_fairness_loss``: compiles their ``compiled=True`` path ahead of a run.
"""

from objectives._evaluation import (
    METRIC_DIRECTIONS,
    METRIC_NAMES,
    THRESHOLD_FREE,
    Evaluation,
    GroupRates,
    evaluate,
    evaluate_detailed,
)
from objectives._fairness_loss import compile_fairness_loss, fairness_loss, fairness_loss_multi
from objectives._sinkhorn import sinkhorn_divergence

__all__ = [
    "METRIC_DIRECTIONS",
    "METRIC_NAMES",
    "THRESHOLD_FREE",
    "Evaluation",
    "GroupRates",
    "compile_fairness_loss",
    "evaluate",
    "evaluate_detailed",
    "fairness_loss",
    "fairness_loss_multi",
    "sinkhorn_divergence",
]
