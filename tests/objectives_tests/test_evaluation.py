"""objectives.evaluate against independent implementations: scikit-learn, fairlearn, brute force."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from objectives import METRIC_DIRECTIONS, METRIC_NAMES, Evaluation, evaluate, evaluate_detailed

from ._references import brute_force_eer, fairlearn_reference, make_data

# --------------------------------------------------------------------------- randomised cross-checks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_groups", [2, 3, 6, 8])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_matches_independent_references(seed: int, n_groups: int, threshold: float) -> None:
    labels, scores, groups = make_data(seed, n_groups, imbalanced=seed % 2 == 0)
    ev = evaluate_detailed(labels, scores, groups, threshold=threshold)
    ref = fairlearn_reference(labels, scores, groups, threshold)

    assert ev.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ev.ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert ev.eer == pytest.approx(brute_force_eer(labels, scores), abs=1e-12)
    for key in ("acc", "f_fpr", "f_oae", "f_dp", "f_meo"):
        assert getattr(ev, key) == pytest.approx(ref[key], abs=1e-12), key

    assert set(ev.groups) == {int(g) for g in np.unique(groups)}
    for g, rates in ev.groups.items():
        assert rates.acc == pytest.approx(ref["by_group"].loc[g, "acc"], abs=1e-12)
        assert rates.pr == pytest.approx(ref["by_group"].loc[g, "pr"], abs=1e-12)
        assert rates.n == np.sum(groups == g)
        if g in ev.groups_without_real:
            assert math.isnan(rates.fpr) and g not in ref["fpr"].index
        else:
            assert rates.fpr == pytest.approx(ref["fpr"].loc[g], abs=1e-12)
        if g in ev.groups_without_fake:
            assert math.isnan(rates.tpr) and g not in ref["tpr"].index
        else:
            assert rates.tpr == pytest.approx(ref["tpr"].loc[g], abs=1e-12)
    assert ev.n_groups_fpr == len(ref["fpr"]) and ev.n_groups_tpr == len(ref["tpr"])


def test_random_data_exercises_groups_without_a_class() -> None:
    """Guard for the test above: the generator must actually produce the left-out-group case."""
    missing = 0
    for seed in range(4):
        for n_groups in (6, 8):
            ev = evaluate_detailed(*make_data(seed, n_groups, imbalanced=seed % 2 == 0))
            missing += len(ev.groups_without_real) + len(ev.groups_without_fake)
    assert missing > 0


def test_evaluate_is_as_dict_of_detailed() -> None:
    labels, scores, groups = make_data(5, 4)
    values = evaluate(labels, scores, groups)
    assert list(values) == [*METRIC_NAMES, "n_groups", "n_groups_fpr", "n_groups_tpr"]
    assert values == evaluate_detailed(labels, scores, groups).as_dict()
    assert all(isinstance(v, float) for k, v in values.items() if k in METRIC_NAMES)
    assert all(type(values[k]) is int for k in ("n_groups", "n_groups_fpr", "n_groups_tpr"))


def test_metric_names_and_directions() -> None:
    assert METRIC_NAMES == ("auc", "acc", "eer", "ap", "f_fpr", "f_oae", "f_dp", "f_meo")
    assert set(METRIC_DIRECTIONS) == set(METRIC_NAMES)
    assert {k for k, v in METRIC_DIRECTIONS.items() if v == "maximize"} == {"auc", "acc", "ap"}
    assert set(METRIC_DIRECTIONS.values()) == {"maximize", "minimize"}


def test_evaluation_is_frozen_and_picklable() -> None:
    ev = evaluate_detailed(*make_data(6, 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.auc = 1.0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(ev)).as_dict() == ev.as_dict()
    assert isinstance(ev, Evaluation)
