"""search.fused_batch: K trials claimed, trained in one fused pass, told; recorded like optimize's."""

import importlib.util
import json
import signal
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
        assert set(trial.user_attrs["artifacts"]) >= {"metrics.json", "curve.csv", "train.log"}
        group_log = (Path(trial.user_attrs["output_dir"]) / "train.log").read_text()
        assert f"study trial {trial.number}" in group_log and "fused epoch 2/2" in group_log
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
    from search.dashboard import read_trial_note

    assert f"run_study.py export --study {path} --pick trial:6" in read_trial_note(study, after[6])  # as optimize named it


def test_the_study_yaml_sets_how_many_trials_a_worker_fuses_and_the_command_line_overrides_it(tmp_path):
    """distributed.fuse: the FF++ study fuses 8 on every GPU worker without anyone passing --fuse."""
    torch.set_num_threads(1)
    path = _tiny_study_module().write_tiny_study_yaml(tmp_path, name="fuse-from-yaml", n_trials=2)
    data = yaml.safe_load(path.read_text())
    data["distributed"] = {**data.get("distributed", {}), "fuse": 2}
    path.write_text(yaml.safe_dump(data))

    def fused_logs(study):
        return ["fused epoch" in (Path(t.user_attrs["output_dir"]) / "train.log").read_text() for t in study.get_trials()]

    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 0
    study = optuna.load_study(study_name="fuse-from-yaml", storage=make_storage(load_study_config(path).storage_url))
    assert fused_logs(study) == [True, True]
    assert run_study.main(["-q", "optimize", "--study", str(path), "--fuse", "1", "--n-trials", "3"]) == 0
    assert fused_logs(study) == [True, True, False]


def test_a_batch_longer_than_the_grace_period_keeps_its_trials_alive(tmp_path, monkeypatch):
    """Optuna writes no heartbeat for ask/tell trials: without ours, another worker would fail a
    fused batch's trials as dead while they are claimed (K samples, seconds each with the GP) or
    while they train."""
    import search.fused_batch as fused_batch
    from search.storage import fail_dead_trials
    from search.workers import TrialBudget

    torch.set_num_threads(1)
    path = _tiny_study_module().write_tiny_study_yaml(tmp_path, name="beating", n_trials=2)
    data = yaml.safe_load(path.read_text())
    data["distributed"] = {**data["distributed"], "heartbeat_interval": 1, "grace_period": 4}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_study_config(path)
    train, claim, failed_as_dead = fused_batch.train_fused, TrialBudget.claim, []

    def slow_claim(self, trial):
        claim(self, trial)
        time.sleep(2.5)  # two of them: the first trial's claim-time heartbeat is 5 s old at the end

    def another_worker_looks():
        other = optuna.load_study(study_name=config.name, storage=make_storage(config.storage_url, config.distributed))
        failed_as_dead.extend(fail_dead_trials(other, storage_of(other)))

    def slow_train(*args, **kwargs):
        another_worker_looks()  # right after the claim
        time.sleep(5)  # past the grace period
        another_worker_looks()
        return train(*args, **kwargs)

    monkeypatch.setattr(TrialBudget, "claim", slow_claim)
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

    train = fused_batch.train_fused
    monkeypatch.setattr(fused_batch, "train_fused", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimize_fused(config, group_size=3, progress=False)
    trials = open_study(config, create=False).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.WAITING] * 3  # each re-queued
    assert all(t.user_attrs["fail_reason"] == "interrupted (Ctrl-C or SIGTERM)" for t in trials[:3])
    assert [(t.system_attrs["failed_trial"], t.params) for t in trials[3:]] == [(t.number, t.params) for t in trials[:3]]

    start_trial, calls = fused_batch.start_trial, []

    def fails_second(trial, study_config):
        calls.append(trial.number)
        if len(calls) == 2:
            raise RuntimeError("sampling broke")
        return start_trial(trial, study_config)

    monkeypatch.setattr(fused_batch, "train_fused", train)
    monkeypatch.setattr(fused_batch, "start_trial", fails_second)
    optimize_fused(config, group_size=2, n_trials=2, progress=False)  # that trial fails alone, as a serial one would
    trials = open_study(config, create=False).get_trials()
    assert trials[4].state == TrialState.FAIL and trials[4].user_attrs["fail_reason"] == "RuntimeError: sampling broke"
    assert [t.state for t in trials[3:]] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert [t.params for t in trials[3:]] == [t.params for t in trials[:3]]  # the interrupted trials, run again
    assert len(trials) == 6


def _study_with(tmp_path, name: str, n_trials: int):
    torch.set_num_threads(1)
    return load_study_config(_tiny_study_module().write_tiny_study_yaml(tmp_path, name=name, n_trials=n_trials))


def test_a_trial_that_cannot_be_recorded_fails_alone(tmp_path, monkeypatch):
    import search.fused_batch as fused_batch

    config = _study_with(tmp_path, "unrecorded", 3)
    finish = fused_batch.finish_trial

    def upload_breaks_for_trial_1(trial, *args, **kwargs):
        if trial.number == 1:
            raise OSError("artifact store full")
        return finish(trial, *args, **kwargs)

    monkeypatch.setattr(fused_batch, "finish_trial", upload_breaks_for_trial_1)
    study = optimize_fused(config, group_size=3, n_trials=3, progress=False)
    states = [t.state for t in study.get_trials()]
    assert states[:3] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["fail_reason"] == "OSError: artifact store full"
    assert states.count(TrialState.COMPLETE) == 3  # a fourth trial took the failed one's slot


def test_a_trial_failed_by_another_worker_meanwhile_does_not_stop_the_batch(tmp_path, monkeypatch):
    """Its heartbeat was late, another worker failed it between the recording and the tell."""
    import search.fused_batch as fused_batch

    config = _study_with(tmp_path, "lost", 2)
    finish = fused_batch.finish_trial

    def failed_elsewhere_after_recording(trial, *args, **kwargs):
        outcome = finish(trial, *args, **kwargs)
        if trial.number == 0:
            trial.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return outcome

    monkeypatch.setattr(fused_batch, "finish_trial", failed_elsewhere_after_recording)
    study = optimize_fused(config, group_size=2, n_trials=2, progress=False)
    states = [t.state for t in study.get_trials()]
    assert states[0] == TrialState.FAIL and states[1:].count(TrialState.COMPLETE) == 2


def test_a_ctrl_c_held_back_during_the_claim_waits_until_the_claimed_trials_are_failed(tmp_path, monkeypatch):
    from search.workers import TrialBudget

    config = _study_with(tmp_path, "held", 4)
    claim = TrialBudget.claim

    def interrupted_then_broken(self, trial):
        if trial.number == 1:
            signal.raise_signal(signal.SIGINT)  # held back: the claim is under way
            raise RuntimeError("storage hiccup")
        return claim(self, trial)

    monkeypatch.setattr(TrialBudget, "claim", interrupted_then_broken)
    with pytest.raises(KeyboardInterrupt):
        optimize_fused(config, group_size=3, progress=False)
    trials = optuna.load_study(study_name=config.name, storage=make_storage(config.storage_url, config.distributed)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert {t.user_attrs["fail_reason"] for t in trials} == {"RuntimeError: storage hiccup"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_tpe_asked_in_batches_is_warned_about():
    from search.fused_batch import batching_advice

    assert "consider sampler: gp" in batching_advice("tpe", 8)
    assert batching_advice("tpe", 1) is None and batching_advice("gp", 8) is None


@pytest.mark.parametrize("n_startup", [2, 3])
def test_gp_asked_in_batches_says_how_many_of_its_trials_optuna_samples_at_random(n_startup):
    """The note's count against Optuna's GPSampler itself, asked 2 at a time as a fused worker asks."""
    from search.config import SamplerConfig
    from search.fused_batch import random_phase_note
    from search.samplers import build_sampler

    config = SamplerConfig(name="gp", n_startup_trials=n_startup)
    sampler = build_sampler(config)
    modelled: list[bool] = []  # per trial: did GP's model choose its parameters?
    sample_relative = sampler.sample_relative

    def recording(study, trial, search_space):
        params = sample_relative(study, trial, search_space)
        modelled.append(bool(params))
        return params

    sampler.sample_relative = recording
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    for _ in range(3):
        batch = [study.ask() for _ in range(2)]
        for trial in batch:
            trial.suggest_float("x", 0, 1)
            trial.suggest_float("y", 1e-4, 1, log=True)
        for trial in batch:
            study.tell(trial, [trial.params["x"], trial.params["y"], 1 - trial.params["x"]])
    random_trials = modelled.index(True)
    assert modelled == [False] * random_trials + [True] * (6 - random_trials)
    assert random_trials == (2 if n_startup == 2 else 4)  # 3 is rounded up to two batches
    assert f"its first {random_trials} trials are random" in random_phase_note(config, 2)
    assert random_phase_note(config, 1) is None
    assert random_phase_note(SamplerConfig(name="tpe", n_startup_trials=n_startup), 2) is None
