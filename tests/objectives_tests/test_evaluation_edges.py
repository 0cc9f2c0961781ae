"""objectives.evaluate on edge cases: left-out groups, degenerate scores, input forms, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from objectives import evaluate, evaluate_detailed

from ._references import brute_force_eer, fairlearn_reference, make_data


def with_fake_only_group():
    """Groups 0, 1 have both classes (and false positives); group 2 has only fakes."""
    labels = np.array([0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.7, 0.2, 0.9, 0.4, 0.6, 0.8, 0.3, 0.7, 0.9, 0.8, 0.2, 0.6])
    groups = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    return labels, scores, groups


def test_group_without_real_samples_is_left_out_of_fpr_terms() -> None:
    labels, scores, groups = with_fake_only_group()
    ev = evaluate_detailed(labels, scores, groups)
    assert ev.groups_without_real == (2,)
    assert ev.groups_without_fake == ()
    assert (ev.n_groups, ev.n_groups_fpr, ev.n_groups_tpr) == (3, 2, 3)
    assert math.isnan(ev.groups[2].fpr)

    # Independent value over the groups with real samples only (fairlearn).
    kept = groups != 2
    pred = (scores >= 0.5).astype(int)
    overall_fpr = pred[labels == 0].mean()  # 3 of 6 reals
    expected = sum(abs(pred[(groups == g) & (labels == 0)].mean() - overall_fpr) for g in (0, 1))
    assert ev.f_fpr == pytest.approx(expected)
    assert ev.f_fpr == pytest.approx(fairlearn_reference(labels[kept], scores[kept], groups[kept], 0.5)["f_fpr"])

    # The public reference code's way (group 2 counted as FPR 0) gives a different, larger number.
    inflated = expected + abs(0.0 - overall_fpr)
    assert overall_fpr > 0 and ev.f_fpr != pytest.approx(inflated)
    # F_MEO: FPR spread 2/3 - 1/3 over groups 0, 1 (2/3 if group 2 were FPR 0); TPR spread 1 - 1/2.
    assert ev.f_meo == pytest.approx(0.5)


def test_group_without_fakes_is_left_out_of_tpr_spread() -> None:
    labels = np.array([0, 0, 1, 0, 1, 0, 0])
    scores = np.array([0.6, 0.2, 0.9, 0.1, 0.8, 0.2, 0.3])
    groups = np.array(["a", "a", "a", "b", "b", "c", "c"])
    ev = evaluate_detailed(labels, scores, groups)
    assert ev.groups_without_fake == ("c",) and ev.groups_without_real == () and ev.n_groups_tpr == 2
    assert math.isnan(ev.groups["c"].tpr)
    # FPR: a 1/2, b 0, c 0 -> spread 1/2. TPR: a 1, b 1 -> spread 0 (c counted as TPR 0 would give 1).
    assert ev.f_meo == pytest.approx(0.5)


def test_single_group_has_no_gaps() -> None:
    labels, scores, _ = make_data(0, 3)
    values = evaluate(labels, scores, np.zeros(len(labels), dtype=int))
    assert values["n_groups"] == values["n_groups_fpr"] == values["n_groups_tpr"] == 1
    for key in ("f_fpr", "f_oae", "f_dp", "f_meo"):
        assert values[key] == 0.0


def test_perfect_and_inverted_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    groups = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    perfect = np.where(labels == 1, 0.9, 0.1)
    values = evaluate(labels, perfect, groups)
    assert (values["auc"], values["eer"], values["ap"], values["acc"]) == (1.0, 0.0, 1.0, 1.0)
    assert values["f_fpr"] == values["f_meo"] == values["f_oae"] == 0.0
    inverted = evaluate(labels, 1 - perfect, groups)
    assert inverted["auc"] == 0.0 and inverted["acc"] == 0.0 and inverted["eer"] == 1.0


def test_all_scores_tied() -> None:
    """A constant (degenerate) model: AUC 0.5, AP = prevalence, everything predicted one class.

    EER is 0.0 here: the ROC has only (0,0) and (1,1), both at gap 1, and ties go to the lowest
    FPR (as in DeepfakeBench's argmin). A known quirk of this EER definition, pinned on purpose.
    """
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    groups = np.array([0, 0, 1, 1, 1, 2, 2, 2, 0, 2])
    values = evaluate(labels, np.full(10, 0.3), groups)
    assert values["auc"] == 0.5 and values["ap"] == pytest.approx(labels.mean())
    assert values["acc"] == pytest.approx(1 - labels.mean()) and values["eer"] == 0.0
    assert values["f_dp"] == 0.0 and values["f_fpr"] == 0.0 and values["f_meo"] == 0.0
    high = evaluate(labels, np.full(10, 0.5), groups)  # score == threshold counts as fake
    assert high["acc"] == pytest.approx(labels.mean()) and high["f_dp"] == 0.0


def test_eer_uses_the_full_roc() -> None:
    """ROC (FPR, TPR): (0, 0), (0, .5), (.5, .5), (1, .5), (1, 1). The exact crossing (.5, .5) lies
    on a straight segment, so ``roc_curve``'s default drop_intermediate=True removes it (EER 0.0).
    """
    labels, scores = np.array([1, 0, 1, 0]), np.array([0.1, 0.7, 0.9, 0.2])
    assert evaluate(labels, scores, [0, 0, 1, 1])["eer"] == 0.5 == brute_force_eer(labels, scores)


def test_threshold_moves_predictions() -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.2, 0.4, 0.45, 0.8])
    groups = np.array([0, 1, 0, 1])
    assert evaluate(labels, scores, groups, threshold=0.5)["acc"] == 0.75
    low = evaluate_detailed(labels, scores, groups, threshold=0.4)
    assert low.acc == 0.75 and low.groups[1].fpr == 1.0 and low.groups[0].fpr == 0.0
    assert low.threshold == 0.4
    assert evaluate(labels, scores, groups, threshold=0.45)["acc"] == 1.0


def test_string_groups_equal_int_groups() -> None:
    labels, scores, groups = make_data(3, 4)
    names = np.array(["female-asian", "female-white", "male-asian", "male-white"])[groups]
    by_int, by_name = evaluate_detailed(labels, scores, groups), evaluate_detailed(labels, scores, list(names))
    assert by_int.as_dict() == by_name.as_dict()
    assert set(by_name.groups) <= set(names.tolist()) and all(type(g) is str for g in by_name.groups)


def test_torch_and_list_inputs_equal_numpy() -> None:
    labels, scores, groups = make_data(4, 3)
    scores = scores.astype(np.float32).astype(np.float64)  # exactly representable in float32
    expected = evaluate(labels, scores, groups)
    as_torch = evaluate(
        torch.tensor(labels), torch.tensor(scores, dtype=torch.float32, requires_grad=True), torch.tensor(groups)
    )
    assert as_torch == pytest.approx(expected)
    assert evaluate(labels.tolist(), scores.tolist(), groups.tolist()) == pytest.approx(expected)
    assert evaluate(labels.astype(bool), scores, groups) == pytest.approx(expected)


@pytest.mark.parametrize("only", [0, 1])
def test_single_class_raises(only: int) -> None:
    with pytest.raises(ValueError, match="only .* samples"):
        evaluate(np.full(4, only), [0.1, 0.2, 0.7, 0.9], [0, 0, 1, 1])


@pytest.mark.parametrize(
    ("y_true", "y_score", "groups", "threshold", "name"),
    [
        ([0, 1, 1], [0.1, 0.9], [0, 0, 1], 0.5, "y_score=2"),
        ([0, 1, 1], [0.1, 0.9, 0.2], [0, 1], 0.5, "groups=2"),
        ([0, 2, 1], [0.1, 0.9, 0.2], [0, 1, 1], 0.5, "y_true"),
        ([0, 1, 1], [0.1, float("nan"), 0.2], [0, 1, 1], 0.5, "y_score"),
        ([0, 1, 1], [0.1, 2.5, -1.0], [0, 1, 1], 0.5, "y_score"),
        ([[0], [1], [1]], [0.1, 0.9, 0.2], [0, 1, 1], 0.5, "y_true"),
        ([0, 1, 1], [0.1, 0.9, 0.2], [0, None, 1], 0.5, "groups"),
        ([0, 1, 1], [0.1, 0.9, 0.2], [0, "a", 1], 0.5, "groups"),
        ([0, 1, 1], [0.1, 0.9, 0.2], [0, 1, 1], 1.5, "threshold"),
        ([], [], [], 0.5, "y_true"),
    ],
)
def test_bad_input_names_the_argument(y_true, y_score, groups, threshold, name) -> None:
    with pytest.raises(ValueError, match=name):
        evaluate(y_true, y_score, np.array(groups, dtype=object), threshold=threshold)
