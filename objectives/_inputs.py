"""Turn what callers hand us (lists, numpy arrays, torch tensors) into checked numpy arrays.

Metrics are computed on the CPU in numpy: they run once per validation pass, not per step, and
scikit-learn wants numpy. Every check raises ValueError naming the argument, because a metric
that silently broadcasts an (n, 1) against an (n,) array or reads logits as probabilities is a
wrong number in a study, not a crash.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(values: Any, name: str) -> np.ndarray:
    """A 1-D numpy array from a list, numpy array or torch tensor (detached, on the CPU)."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor, without importing torch
        tensor = values.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # bf16/fp16 have no numpy dtype
        array = tensor.numpy()
    else:
        array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def check_labels(y_true: Any) -> np.ndarray:
    """0/1 labels (1 = fake) as an int64 array; bools are accepted."""
    labels = to_numpy(y_true, "y_true")
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"y_true must be numeric 0/1 labels, got dtype {labels.dtype}")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(
            f"y_true must contain only 0 (real) and 1 (fake); found {np.unique(labels[bad])[:5]}"
        )
    return labels.astype(np.int64)


def check_scores(y_score: Any) -> np.ndarray:
    """Finite probabilities in [0, 1] as float64 (logits are a caller bug: threshold 0.5 would lie)."""
    scores = to_numpy(y_score, "y_score")
    if not np.issubdtype(scores.dtype, np.number) or scores.dtype == bool:
        raise ValueError(f"y_score must be numeric, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"y_score contains {int((~np.isfinite(scores)).sum())} NaN or inf value(s)")
    if scores.min() < 0.0 or scores.max() > 1.0:
        raise ValueError(
            f"y_score must be probabilities in [0, 1] (apply a sigmoid to logits); "
            f"got range [{scores.min():.4g}, {scores.max():.4g}]"
        )
    return scores


def check_groups(groups: Any) -> np.ndarray:
    """Group labels (ints or strings); NaN/None labels are rejected rather than silently grouped."""
    array = to_numpy(groups, "groups")
    if array.dtype == object:
        if any(g is None or (isinstance(g, float) and np.isnan(g)) for g in array):
            raise ValueError("groups contains None or NaN labels")
        if len({isinstance(g, str) for g in array}) > 1:  # unsortable, and almost always a bug
            raise ValueError("groups mixes string and non-string labels")
    elif np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        raise ValueError("groups contains NaN labels")
    return array


def check_threshold(threshold: float) -> float:
    """A decision threshold on probabilities, in [0, 1]."""
    value = float(threshold)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    return value


def check_same_length(**arrays: np.ndarray) -> None:
    """All arrays describe the same samples."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {', '.join(f'{k}={v}' for k, v in lengths.items())}")


def as_python(label: Any) -> Any:
    """numpy scalar -> plain Python value, so group keys print and serialise cleanly (JSON, YAML)."""
    return label.item() if isinstance(label, np.generic) else label
