"""Cross-dataset evaluation of the tiny study's trials on its synthetic held-out test sets."""

from __future__ import annotations

import copy

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
from search.evaluate import EvaluateError, best_threshold, load_test_results, select_trials, trial_checkpoint


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
        assert 0 < result["tuned_threshold"] < 1
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


def test_checkpoint_comes_from_the_artifact_store_when_the_run_folder_is_gone(tiny, tmp_path):
    _, config, study = tiny
    trial = study.best_trials[0]
    moved = copy.deepcopy(trial)
    moved.user_attrs = {**trial.user_attrs, "output_dir": str(tmp_path / "gone")}
    path = trial_checkpoint(moved, config.artifact_dir, tmp_path)
    assert path.parent == tmp_path
    assert load_detector(path).state_dict().keys() == load_detector(trial_checkpoint(trial, config.artifact_dir, tmp_path)).state_dict().keys()


def test_select_trials(tiny):
    _, _, study = tiny
    assert [t.number for t in select_trials(study, "pareto")] == sorted(t.number for t in study.best_trials)
    assert [t.number for t in select_trials(study, "all")] == [t.number for t in study.trials]
    assert [t.number for t in select_trials(study, "2, 0,2")] == [2, 0]
    for bad in ("7", "x", ",", "1;2"):
        with pytest.raises(EvaluateError):
            select_trials(study, bad)


def test_best_threshold_maximises_balanced_accuracy():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.75, 0.8, 0.9, 0.95, 0.3, 0.85, 0.99])
    threshold = best_threshold(labels, scores)
    predicted = scores >= threshold
    balanced = (predicted[labels == 1].mean() + (1 - predicted[labels == 0].mean())) / 2
    candidates = [((scores >= t)[labels == 1].mean() + (1 - (scores >= t)[labels == 0].mean())) / 2 for t in scores]
    assert balanced == pytest.approx(max(candidates))
    assert 0 < threshold < 1


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
