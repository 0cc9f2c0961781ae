"""Cross-dataset evaluation of the tiny study's trials on its synthetic held-out test sets."""

from __future__ import annotations

import copy
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

try:
    from ._tiny_study import tiny_study
except ImportError:  # tests/search_tests is not a package
    from _tiny_study import tiny_study

import objectives
import run_study
from model import prepare
from model.scoring import load_detector, score_cache
from search import dashboard
from search.evaluate import EvaluateError, best_threshold, load_test_results, select_trials, trial_checkpoint, trial_threshold


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_study(tmp_path_factory)


@pytest.fixture(scope="module")
def prepared(tiny):
    _, config, _ = tiny
    return prepare(config.base_run_config(), progress=False, with_test_caches=True)


def test_evaluate_stores_per_dataset_metrics_for_every_pareto_trial(tiny, prepared, capsys):
    path, config, study = tiny
    assert run_study.main(["-q", "evaluate", "--study", str(path), "--trials", "pareto"]) == 0
    assert "mean auc" in capsys.readouterr().out
    results = load_test_results(study)
    datasets = sorted(prepared.test_caches)
    assert len(datasets) >= 2
    for trial in study.best_trials:
        result = results[trial.number]
        assert result["datasets"] == datasets and result["stage1_matches"]
        for name in [*datasets, "mean"]:
            for metric in objectives.METRIC_NAMES:
                assert np.isfinite(result[f"test_{name}_{metric}"]), (name, metric)
                assert np.isfinite(result[f"tuned_test_{name}_{metric}"]), (name, metric)
        for metric in objectives.METRIC_NAMES:
            mean = np.mean([result[f"test_{d}_{metric}"] for d in datasets])
            assert result[f"test_mean_{metric}"] == pytest.approx(mean)
        assert 0 <= result["tuned_threshold"] <= 1
        assert "Test sets" in dashboard.read_trial_note(study, trial)
        assert "evaluation.json" in dashboard.trial_artifacts(study, trial)


def test_scores_reproduce_the_trials_validation_and_test_metrics(tiny, prepared):
    _, config, study = tiny
    trial = study.best_trials[0]
    detector = load_detector(trial_checkpoint(trial, config.artifact_dir, config.workdir))
    frame = prepared.manifest.frame
    val = np.flatnonzero(frame["split"].to_numpy() == "val")
    scores = score_cache(detector, prepared.cache, val)
    metrics = objectives.evaluate(frame["label"].to_numpy()[val], scores, frame["group"].to_numpy()[val])
    assert metrics["auc"] == pytest.approx(trial.user_attrs["val_auc"], abs=1e-6)
    assert metrics["f_meo"] == pytest.approx(trial.user_attrs["val_f_meo"], abs=1e-6)


def test_checkpoint_is_the_trials_artifact_and_its_run_folder_only_without_one(tiny, tmp_path):
    _, config, study = tiny
    trial = study.best_trials[0]
    path = trial_checkpoint(trial, config.artifact_dir, tmp_path)
    assert path.parent == tmp_path  # downloaded from the store, although the run folder exists
    folder_only = copy.deepcopy(trial)
    folder_only.user_attrs = {**trial.user_attrs, "artifacts": {}}
    assert trial_checkpoint(folder_only, config.artifact_dir, tmp_path) == Path(trial.user_attrs["output_dir"]) / "best.pt"
    assert load_detector(path).state_dict().keys() == load_detector(Path(trial.user_attrs["output_dir"]) / "best.pt").state_dict().keys()


def _without_artifact(trial, output_dir):
    moved = copy.deepcopy(trial)
    moved.user_attrs = {**trial.user_attrs, "artifacts": {}, "output_dir": str(output_dir)}
    return moved


def test_a_run_folder_holding_another_trials_checkpoint_is_refused(tiny, prepared, caplog):
    from search.evaluate import evaluate_trial

    _, config, study = tiny
    trials = sorted(study.trials, key=lambda t: t.user_attrs["val_auc"])
    low, high = trials[0], trials[-1]
    assert high.user_attrs["val_auc"] - low.user_attrs["val_auc"] > 1e-3
    # as when another storage's study of the same name in this workdir trained its trial `low.number` there
    impostor = _without_artifact(low, high.user_attrs["output_dir"])
    checkpoint = trial_checkpoint(impostor, config.artifact_dir, config.workdir)
    assert impostor.user_attrs["device"] == "cpu"
    with pytest.raises(EvaluateError, match=rf"trial {low.number}: .* scores the validation set at AUC .* not this trial's checkpoint"):
        evaluate_trial(impostor, checkpoint, prepared, threshold=0.5, device="cpu", batch_size=64)
    # trained on a GPU (bf16), scored on the CPU: a difference may be rounding, so it is a warning
    impostor.user_attrs["device"] = "cuda:0"
    with caplog.at_level("WARNING", logger="search.evaluate"):
        result = evaluate_trial(impostor, checkpoint, prepared, threshold=0.5, device="cpu", batch_size=64)
    assert "rounding may explain it" in caplog.text and result["val_auc_recomputed"] == pytest.approx(high.user_attrs["val_auc"], abs=1e-6)


def test_a_trial_without_a_checkpoint_is_named_and_the_others_are_stored(tiny, prepared, tmp_path):
    from search.evaluate import evaluate_study

    _, config, study = tiny
    good, lost = study.best_trials[0], _without_artifact(study.best_trials[0], tmp_path / "gone")
    with pytest.raises(EvaluateError, match=rf"1 of 2 trials not evaluated .* trial {good.number}: no best.pt"):
        evaluate_study(config, study, [lost, good], prepared=prepared, progress=False)
    assert good.number in load_test_results(study)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_trial_whose_checkpoint_is_damaged_is_named_and_the_others_are_stored(tiny, prepared, tmp_path, damage):
    from search.evaluate import evaluate_study

    _, config, study = tiny
    good = study.best_trials[0]
    damaged = _without_artifact(good, tmp_path / "run")  # read from its run folder, which holds a damaged copy
    (tmp_path / "run").mkdir()
    original = trial_checkpoint(good, config.artifact_dir, tmp_path).read_bytes()
    (tmp_path / "run" / "best.pt").write_bytes(original[:1000] if damage == "truncated" else b"not a checkpoint" * 100)
    damaged.number = 10_000 + good.number  # (a number of its own, to tell the two apart)
    with pytest.raises(EvaluateError, match=rf"1 of 2 trials not evaluated .* trial {damaged.number}: its best.pt cannot be loaded"):
        evaluate_study(config, study, [damaged, good], prepared=prepared, progress=False)
    assert good.number in load_test_results(study)


def test_test_sets_are_scored_at_the_trials_own_threshold(tiny, prepared, monkeypatch):
    import search.evaluate as evaluate

    _, config, study = tiny
    trial = copy.deepcopy(study.best_trials[0])
    trial.user_attrs = {**trial.user_attrs, "training": {**trial.user_attrs["training"], "threshold": 0.3}}  # searched
    monkeypatch.setattr(evaluate, "store_result", lambda study, result: result)  # the shared study keeps its real results
    monkeypatch.setattr(evaluate, "_annotate", lambda *args: None)
    result = evaluate.evaluate_study(config, study, [trial], prepared=prepared, progress=False)[trial.number]
    assert result["threshold"] == 0.3 != config.training.threshold
    frame = prepared.test_manifests[result["datasets"][0]].frame
    detector = load_detector(trial_checkpoint(trial, config.artifact_dir, config.workdir))
    scores = score_cache(detector, prepared.test_caches[result["datasets"][0]], np.arange(len(frame)))
    at_03 = objectives.evaluate(frame["label"].to_numpy(), scores, frame["group"].to_numpy(), threshold=0.3)
    assert result[f"test_{result['datasets'][0]}_acc"] == pytest.approx(at_03["acc"])


def test_select_trials(tiny):
    _, _, study = tiny
    assert [t.number for t in select_trials(study, "pareto")] == sorted(t.number for t in study.best_trials)
    assert [t.number for t in select_trials(study, "all")] == [t.number for t in study.trials]
    assert [t.number for t in select_trials(study, "2, 0,2")] == [2, 0]
    for bad in ("7", "x", ",", "1;2"):
        with pytest.raises(EvaluateError):
            select_trials(study, bad)


def _exact_balanced(labels, scores, t) -> Fraction:
    predicted = scores >= t
    return (Fraction(int(predicted[labels == 1].sum()), int((labels == 1).sum()))
            + Fraction(int((~predicted[labels == 0]).sum()), int((labels == 0).sum()))) / 2


def test_best_threshold_maximises_balanced_accuracy():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.75, 0.8, 0.9, 0.95, 0.3, 0.85, 0.99])
    threshold = best_threshold(labels, scores)
    predicted = scores >= threshold
    balanced = (predicted[labels == 1].mean() + (1 - predicted[labels == 0].mean())) / 2
    candidates = [((scores >= t)[labels == 1].mean() + (1 - (scores >= t)[labels == 0].mean())) / 2 for t in scores]
    assert balanced == pytest.approx(max(candidates))
    assert 0 < threshold < 1


@pytest.mark.parametrize("seed", range(40))
def test_best_threshold_among_exact_ties_keeps_the_trials_own_or_takes_the_nearest(seed):
    """Balanced accuracy in exact fractions: the tuned threshold is a maximiser; among equals the
    trial's own threshold stays when it is one, else the nearest maximiser is taken (before,
    float rounding of (tpr + 1 - fpr) / 2 chose among ties)."""
    rng = np.random.default_rng(seed)
    labels, scores = np.array([0] * 24 + [1] * 24), rng.random(48)
    current = float(rng.uniform(0.3, 0.7))
    values = {t: _exact_balanced(labels, scores, t) for t in np.unique(scores)}
    best = max(values.values())
    maximisers = [t for t, v in values.items() if v == best]
    tuned = best_threshold(labels, scores, current=current)
    if _exact_balanced(labels, scores, current) == best:
        assert tuned == current
    else:
        assert tuned == min(maximisers, key=lambda t: abs(t - current))


def test_best_threshold_is_not_moved_off_a_score_near_0_or_1():
    """A confident detector's float32 scores reach 1.0 (and 5e-7): the best threshold is that score,
    not a value clipped into (0, 1) that would classify the scores between the two otherwise."""
    labels = np.array([0, 0, 1, 1])
    for scores in (np.array([0.0, 0.0, 5e-7, 0.9]), np.array([0.3, 0.99999994, 1.0, 1.0], dtype=np.float32)):
        threshold = best_threshold(labels, scores)
        assert _exact_balanced(labels, scores, threshold) == 1, (scores, threshold)


def test_best_threshold_keeps_an_own_threshold_that_is_already_best():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.9])  # every threshold in (0.2, 0.8] separates them
    assert best_threshold(labels, scores, current=0.5) == 0.5
    assert best_threshold(labels, scores, current=0.95) == 0.8  # the nearest of the best
    with pytest.raises(ValueError, match="real and fake"):
        best_threshold(np.ones(4), scores)


def test_results_from_another_stage1_are_flagged_in_the_note(tiny):
    """A checkpoint evaluated with a Stage 1 adapter other than the one it trained with (the data or
    backbone changed since): the numbers are kept, but the trial's note says they are not comparable."""
    from search._notes import trial_note

    path, config, study = tiny
    trial = study.best_trials[0]
    if trial.number not in load_test_results(study):  # this test run alone
        assert run_study.main(["-q", "evaluate", "--study", str(path), "--trials", str(trial.number)]) == 0
    result = load_test_results(study)[trial.number]
    assert "Warning" not in trial_note(trial, config, test=result)
    stale = trial_note(trial, config, test={**result, "stage1_matches": False})
    assert "**Warning:** evaluated with a different frozen Stage 1 adapter" in stale


def _gaps_by_hand(labels: np.ndarray, predicted: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """ACC and the four fairness gaps as DESIGN.md defines them, from sklearn confusion matrices
    (not objectives): F_FPR = sum over groups with a real sample of |FPR_g - FPR|, F_OAE / F_DP =
    max - min over groups of accuracy / predicted-fake share, F_MEO = max(dFPR, dTPR)."""
    from sklearn.metrics import accuracy_score, confusion_matrix

    def spread(values):
        return max(values) - min(values) if len(values) >= 2 else 0.0

    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    overall_fpr = fp / (fp + tn)
    fpr, tpr, acc, pr = [], [], [], []
    for group in np.unique(groups):
        tn, fp, fn, tp = confusion_matrix(labels[groups == group], predicted[groups == group], labels=[0, 1]).ravel()
        if fp + tn:
            fpr.append(fp / (fp + tn))
        if tp + fn:
            tpr.append(tp / (tp + fn))
        acc.append((tp + tn) / (tp + tn + fp + fn))
        pr.append((tp + fp) / (tp + tn + fp + fn))
    return {"acc": accuracy_score(labels, predicted), "f_fpr": sum(abs(f - overall_fpr) for f in fpr),
            "f_oae": spread(acc), "f_dp": spread(pr), "f_meo": max(spread(fpr), spread(tpr))}


def test_the_tuned_threshold_maximises_validation_balanced_accuracy_and_the_test_sets_are_scored_at_it(tiny, prepared, tmp_path):
    """An independent check of the tuning: the validation scores of each Pareto trial's checkpoint
    (the artifact evaluate downloads), brute force over every score as threshold (best_threshold's
    candidates: predicted fake = score >= t) with sklearn's balanced accuracy, and the test metrics
    at the stored tuned threshold computed by hand, per test set and averaged."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    path, config, study = tiny
    results = load_test_results(study)
    if any(t.number not in results for t in study.best_trials):  # this test run alone
        assert run_study.main(["-q", "evaluate", "--study", str(path), "--trials", "pareto"]) == 0
        results = load_test_results(study)
    frame = prepared.manifest.frame
    val = np.flatnonzero(frame["split"].to_numpy() == "val")
    val_labels, val_groups = frame["label"].to_numpy()[val], frame["group"].to_numpy()[val]
    tuned_trials = []
    for trial in study.best_trials:
        result = results[trial.number]
        tuned, plain = result["tuned_threshold"], result["threshold"]
        assert plain == trial_threshold(trial, config)
        detector = load_detector(trial_checkpoint(trial, config.artifact_dir, tmp_path))
        val_scores = score_cache(detector, prepared.cache, val)
        assert roc_auc_score(val_labels, val_scores) == result["val_auc_recomputed"]  # the very scores evaluate tuned on

        candidates = np.unique(val_scores)
        balanced = np.array([balanced_accuracy_score(val_labels, val_scores >= t) for t in candidates])
        # Equal balanced accuracies are fractions with denominator 2 * n_real * n_fake: 1e-9 groups
        # exact ties only. The tuned threshold is the trial's own when that is one of the maximisers,
        # else one of them (which one: test_best_threshold_among_exact_ties_...).
        maximisers = candidates[balanced > balanced.max() - 1e-9]
        if balanced_accuracy_score(val_labels, val_scores >= plain) > balanced.max() - 1e-9:
            assert tuned == plain, trial.number  # the trial's own threshold is already one of the best: kept
            continue
        assert tuned in maximisers, (trial.number, tuned, maximisers)
        tuned_trials.append(trial.number)
        # predicted fake = score >= tuned: the tuned threshold is a validation score, so > would differ
        assert result["tuned_val_acc"] == accuracy_score(val_labels, val_scores >= tuned) != accuracy_score(val_labels, val_scores > tuned)
        for metric, value in _gaps_by_hand(val_labels, val_scores >= tuned, val_groups).items():
            assert result[f"tuned_val_{metric}"] == pytest.approx(value, abs=1e-12), (trial.number, metric)
        assert tuned != plain  # else the checks below could not tell the two thresholds apart

        at_tuned, at_plain = {}, {}
        for name in result["datasets"]:
            test_frame = prepared.test_manifests[name].frame
            rows = np.flatnonzero(test_frame["split"].to_numpy() == "test")
            assert result[f"n_{name}"] == len(rows) > 0
            labels, groups = test_frame["label"].to_numpy()[rows], test_frame["group"].to_numpy()[rows]
            scores = score_cache(detector, prepared.test_caches[name], rows)
            assert roc_auc_score(labels, scores) == pytest.approx(result[f"test_{name}_auc"], abs=1e-12)
            at_tuned[name], at_plain[name] = _gaps_by_hand(labels, scores >= tuned, groups), _gaps_by_hand(labels, scores >= plain, groups)
            for metric in at_tuned[name]:
                assert result[f"tuned_test_{name}_{metric}"] == pytest.approx(at_tuned[name][metric], abs=1e-12), (trial.number, name, metric)
                assert result[f"test_{name}_{metric}"] == pytest.approx(at_plain[name][metric], abs=1e-12), (trial.number, name, metric)
            for metric in objectives.THRESHOLD_FREE:
                assert result[f"tuned_test_{name}_{metric}"] == result[f"test_{name}_{metric}"], (trial.number, name, metric)
        for metric in ("acc", "f_fpr", "f_oae", "f_dp", "f_meo"):
            mean = np.mean([at_tuned[name][metric] for name in result["datasets"]])
            assert result[f"tuned_test_mean_{metric}"] == pytest.approx(mean, abs=1e-12), (trial.number, metric)
        # not vacuous: the tuned threshold changes this trial's test accuracy and F_FPR on some test set,
        # so test sets scored at the trial's own threshold would fail the comparisons above
        assert any(at_tuned[name]["acc"] != at_plain[name]["acc"] for name in result["datasets"]), trial.number
        assert any(at_tuned[name]["f_fpr"] != at_plain[name]["f_fpr"] for name in result["datasets"]), trial.number
    assert tuned_trials, "no Pareto trial moved its threshold: the comparisons above checked nothing"


def test_no_tune_threshold_stores_and_prints_no_tuned_metrics_and_keeps_earlier_tuned_ones(tiny, tmp_path, capsys):
    """On a copy of the study's database without its stored results (the shared study keeps its
    own): --no-tune-threshold stores and prints no tuned metrics and the report has no tuned
    section; after a tuned run, a --no-tune-threshold run keeps the tuned results of the same
    checkpoints instead of erasing them."""
    import sqlite3

    from search import open_study
    from search.config import load_study_config
    from search.evaluate import TEST_ATTR_PREFIX

    path, config, study = tiny
    copy_db = tmp_path / "study.db"
    source, target = sqlite3.connect(str(config.workdir / "study.db")), sqlite3.connect(str(copy_db))
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    storage = f"sqlite:///{copy_db}"
    evaluate = ["-q", "evaluate", "--study", str(path), "--storage", storage, "--trials", "all"]
    copied = lambda: open_study(load_study_config(path, storage=storage), create=False)  # noqa: E731
    for key in [k for k in copied().user_attrs if k.startswith(TEST_ATTR_PREFIX)]:
        copied().set_user_attr(key, None)  # (Optuna cannot delete a user attr; load_test_results skips it)
    assert load_test_results(copied()) == {}
    numbers = [t.number for t in select_trials(study, "all")]
    shared = load_test_results(study)

    assert run_study.main([*evaluate, "--no-tune-threshold"]) == 0
    out = capsys.readouterr().out
    assert "mean auc" in out and "tuned" not in out
    results = load_test_results(copied())
    assert sorted(results) == numbers
    for number in numbers:
        assert np.isfinite(results[number]["test_mean_auc"]) and results[number]["datasets"]
        assert [k for k in results[number] if k.startswith("tuned")] == [], number
    out_dir = tmp_path / "report"
    assert run_study.main(["-q", "report", "--study", str(path), "--storage", storage, "--out", str(out_dir)]) == 0
    markdown = (out_dir / "report.md").read_text()
    assert "## Test sets: AUC per dataset" in markdown
    assert "Threshold tuned on validation" not in markdown and "(tuned)" not in markdown

    assert run_study.main(evaluate) == 0
    assert "tuned thr" in capsys.readouterr().out
    tuned = load_test_results(copied())
    assert all("tuned_threshold" in tuned[n] for n in numbers)
    assert run_study.main([*evaluate, "--no-tune-threshold"]) == 0
    assert load_test_results(copied()) == tuned  # the same checkpoints: their tuned results are kept
    assert load_test_results(study) == shared  # the shared study is untouched
