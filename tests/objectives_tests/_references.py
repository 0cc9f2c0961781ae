"""Independent reference implementations and test data for objectives.evaluate.

Nothing here calls objectives: fairlearn's MetricFrame for the group metrics, a brute-force
threshold sweep for EER.
"""

from __future__ import annotations

import numpy as np
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score



def make_data(seed: int, n_groups: int, n: int = 400, imbalanced: bool = True):
    """Scores with a forgery signal, per-group bias and fake rates, group sizes from a Dirichlet.

    Scores are rounded to 2 decimals so ties are common. With 6+ groups the last group has only
    fakes, with 8 the one before it only reals.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(n_groups, 0.6 if imbalanced else 50.0))
    groups = rng.choice(n_groups, size=n, p=sizes)
    labels = (rng.random(n) < rng.uniform(0.2, 0.8, n_groups)[groups]).astype(int)
    if n_groups >= 6:  # plant a group with no real samples (left out of FPR terms)...
        labels[groups == n_groups - 1] = 1
    if n_groups >= 8:  # ...and one with no fakes (left out of TPR terms)
        labels[groups == n_groups - 2] = 0
    logits = 1.5 * (2 * labels - 1) + rng.normal(0, 0.8, n_groups)[groups] + rng.normal(0, 1.5, n)
    scores = np.round(1 / (1 + np.exp(-logits)), 2)
    assert 0 < labels.sum() < n
    return labels, scores, groups


def fpr_metric(y_true, y_pred):
    return false_positive_rate(y_true, y_pred, pos_label=1)


def tpr_metric(y_true, y_pred):
    return true_positive_rate(y_true, y_pred, pos_label=1)


def fairlearn_reference(labels, scores, groups, threshold):
    """Every group metric from fairlearn's MetricFrame, FPR/TPR frames restricted to eligible groups."""
    pred = (scores >= threshold).astype(int)
    frame = MetricFrame(
        metrics={"acc": accuracy_score, "pr": selection_rate}, y_true=labels, y_pred=pred, sensitive_features=groups
    )
    has_real = np.isin(groups, np.unique(groups[labels == 0]))
    has_fake = np.isin(groups, np.unique(groups[labels == 1]))
    fpr = MetricFrame(metrics=fpr_metric, y_true=labels[has_real], y_pred=pred[has_real], sensitive_features=groups[has_real])
    tpr = MetricFrame(metrics=tpr_metric, y_true=labels[has_fake], y_pred=pred[has_fake], sensitive_features=groups[has_fake])
    overall_fpr = fpr_metric(labels, pred)
    return {
        "acc": accuracy_score(labels, pred),
        "f_fpr": float(np.abs(fpr.by_group - overall_fpr).sum()),
        "f_oae": float(frame.difference()["acc"]),
        "f_dp": float(demographic_parity_difference(labels, pred, sensitive_features=groups)),
        "f_meo": float(max(fpr.difference(), tpr.difference())),
        "by_group": frame.by_group,
        "fpr": fpr.by_group,
        "tpr": tpr.by_group,
    }


def brute_force_eer(labels, scores):
    """Sweep every distinct score as a threshold (plus +inf); FPR where |FNR - FPR| is smallest.

    Ties (equal gaps up to rounding) resolve to the lowest FPR, the documented rule.
    """
    real, fake = labels == 0, labels == 1
    points = []
    for t in np.concatenate([np.unique(scores), [np.inf]]):
        pred = scores >= t
        fpr = np.sum(pred & real) / real.sum()
        fnr = np.sum(~pred & fake) / fake.sum()
        points.append((abs(fnr - fpr), fpr))
    best = min(gap for gap, _ in points)
    return min(fpr for gap, fpr in points if gap <= best + 1e-12)
