"""search.fused_batch: K trials claimed, trained in one fused pass, told; recorded like optimize's."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from optuna_dashboard._note import note_ver_key

import run_study
from search import load_study_config
from search.fused_batch import optimize_fused
from search.storage import make_storage, storage_of


def _tiny_study_module():
    if "_tiny_study" not in sys.modules:  # tests/ is not a package: load the shared helper by path
        spec = importlib.util.spec_from_file_location("_tiny_study", Path(__file__).with_name("_tiny_study.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["_tiny_study"] = module
        spec.loader.exec_module(module)
    return sys.modules["_tiny_study"]


def test_fused_batches_finish_the_budget_and_record_each_trial(tmp_path):
    torch.set_num_threads(1)
    path = _tiny_study_module().write_tiny_study_yaml(tmp_path, name="fused", n_trials=5)
    config = load_study_config(path)
    study = optimize_fused(config, group_size=3, progress=False)
    trials = study.get_trials()
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:
        assert trial.user_attrs["epochs_run"] == 2 and len(trial.user_attrs["curve"]) == 2
        # infeasible exactly when no epoch was out of the degenerate phase (no stop rule here)
        assert trial.user_attrs["degenerate"] is all(r["degenerate"] for r in trial.user_attrs["curve"])
        assert trial.user_attrs["training"]["lr"] == trial.params["lr"]
        assert set(trial.user_attrs["artifacts"]) >= {"metrics.json", "curve.csv"}
        assert trial.values[0] == trial.user_attrs["val_auc"]
    # the command line continues the study to a larger budget, never overwriting
    before = [(t.number, t.params, t.values) for t in trials]
    assert run_study.main(["-q", "optimize", "--study", str(path), "--fuse", "4", "--n-trials", "7"]) == 0
    after = study.get_trials()
    assert len(after) == 7 and [(t.number, t.params, t.values) for t in after[:5]] == before
    assert all(t.state == TrialState.COMPLETE for t in after)
    assert len({json.dumps(t.params, sort_keys=True) for t in after}) == 7
    assert all(t.user_attrs["worker"] and t.user_attrs["device"] == "cpu" for t in after)
    # each fused trial has its dashboard note, as a serial one does
    notes = study._storage.get_study_system_attrs(study._study_id)
    assert all(note_ver_key(t._trial_id) in notes for t in after)


def test_a_batch_longer_than_the_grace_period_keeps_its_trials_alive(tmp_path, monkeypatch):
    """Optuna writes no heartbeat for ask/tell trials: without ours, another worker would fail a
    fused batch's trials as dead while they train."""
    import search.fused_batch as fused_batch
    from search.storage import fail_dead_trials

    torch.set_num_threads(1)
    path = _tiny_study_module().write_tiny_study_yaml(tmp_path, name="beating", n_trials=2)
    data = yaml.safe_load(path.read_text())
    data["distributed"] = {**data["distributed"], "heartbeat_interval": 1, "grace_period": 3}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_study_config(path)
    train, failed_as_dead = fused_batch.train_fused, []

    def slow_train(*args, **kwargs):
        time.sleep(4.5)  # past the grace period since the claim; then another worker looks for dead trials
        other = optuna.load_study(study_name=config.name, storage=make_storage(config.storage_url, config.distributed))
        failed_as_dead.extend(fail_dead_trials(other, storage_of(other)))
        return train(*args, **kwargs)

    monkeypatch.setattr(fused_batch, "train_fused", slow_train)
    study = optimize_fused(config, group_size=2, progress=False)
    assert failed_as_dead == []
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2


def test_an_interrupt_or_an_error_mid_batch_leaves_no_trial_running(tmp_path, monkeypatch):
    import search.fused_batch as fused_batch
    from search import open_study

    torch.set_num_threads(1)
    config = load_study_config(_tiny_study_module().write_tiny_study_yaml(tmp_path, name="interrupted", n_trials=3))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fused_batch, "train_fused", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimize_fused(config, group_size=3, progress=False)
    trials = open_study(config, create=False).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all(t.user_attrs["fail_reason"] == "interrupted (KeyboardInterrupt)" for t in trials)

    start_trial, calls = fused_batch.start_trial, []

    def fails_second(trial, study_config):
        calls.append(trial.number)
        if len(calls) == 2:
            raise RuntimeError("sampling broke")
        return start_trial(trial, study_config)

    monkeypatch.setattr(fused_batch, "start_trial", fails_second)
    with pytest.raises(RuntimeError, match="sampling broke"):
        optimize_fused(config, group_size=2, n_trials=5, progress=False)
    trials = open_study(config, create=False).get_trials()
    assert len(trials) == 5 and all(t.state == TrialState.FAIL for t in trials)
    assert [t.user_attrs["fail_reason"] for t in trials[3:]] == ["RuntimeError: sampling broke"] * 2
