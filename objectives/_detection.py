"""Detection metrics: the threshold-free AUC, AP and equal error rate, and ACC at the threshold.

AUC and AP come straight from scikit-learn. EER has several definitions in the literature
(interpolated crossing, mean of FPR and FNR, ...); ours is the one the seed report's code uses:
the FPR at the ROC point where |FNR - FPR| is smallest, on the full ROC (every distinct score is
a threshold, so ``drop_intermediate=False``).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> float:
    """FPR at the ROC point minimising |FNR - FPR|; ties go to the lowest-FPR point.

    The gap is compared in integer counts (|FN * n_real - FP * n_fake|), so a tie between two
    ROC points is a real tie rather than a rounding accident, and the result is reproducible.
    """
    n_fake = int(labels.sum())
    n_real = int(labels.size - n_fake)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    false_pos = np.rint(fpr * n_real).astype(np.int64)
    false_neg = n_fake - np.rint(tpr * n_fake).astype(np.int64)
    gap = np.abs(false_neg * n_real - false_pos * n_fake)
    best = int(np.argmin(gap))  # roc_curve orders by increasing FPR: first minimum = lowest FPR
    return float(false_pos[best] / n_real)


def detection_metrics(labels: np.ndarray, scores: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """AUC, ACC, EER, AP of one evaluated set; labels must contain both classes."""
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "acc": float(np.mean(predicted == labels)),
        "eer": equal_error_rate(labels, scores),
        "ap": float(average_precision_score(labels, scores)),
    }
