"""Warm start (`warm_start: true`, `optimize --warm-start`) and the time budget (`budget.timeout`,
`optimize --timeout`).

The reference values below are typed from the hand-tuning report (seed 002, section 2.1, the
table "하이퍼파라미터 변경 이력") and DESIGN.md, not copied from search/space.py: they are the
independent source the queued trials are checked against.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time

import pytest
import torch
import yaml
from optuna.trial import TrialState

try:
    from ._tiny_study import write_tiny_study_yaml
except ImportError:  # tests/search_tests is not a package
    from _tiny_study import write_tiny_study_yaml

import run_study
import search.study
import search.workers
from search import load_study_config, open_study
from search.space import suggest

# Report section 2.1: Exp1 (Baseline), Exp2 (Fairness Boost), Exp3 (Balanced Recovery).
REPORT = {
    "exp1_baseline": {"lr": 0.0003, "weight_decay": 0.01, "warmup_epochs": 3, "num_epochs": 30, "dropout": 0.1,
                      "label_smoothing": 0.0, "lambda_fair": 0.05, "sinkhorn_blur": 1e-4, "gate_init_bias": 1.0},
    "exp2_fairness_boost": {"lr": 0.0002, "weight_decay": 0.05, "warmup_epochs": 2, "num_epochs": 25, "dropout": 0.2,
                            "label_smoothing": 0.1, "lambda_fair": 0.5, "sinkhorn_blur": 1e-3, "gate_init_bias": 1.0},
    "exp3_balanced_recovery": {"lr": 0.0003, "weight_decay": 0.01, "warmup_epochs": 3, "num_epochs": 30, "dropout": 0.15,
                               "label_smoothing": 0.1, "lambda_fair": 0.15, "sinkhorn_blur": 1e-4, "gate_init_bias": 0.0},
}
LABELS = sorted(REPORT)
# studies/demo.yaml's search space (the tiny studies keep it): every report value lies inside it
DEMO_SPACE = ("lr", "weight_decay", "lambda_fair", "sinkhorn_blur", "dropout", "gate_init_bias")


def _yaml(directory, *, name: str, n_trials: int = 3, warm_start: bool = True, **sections):
    """The session's tiny study YAML (96 train / 48 val images, 2 epochs, random sampler), with
    ``warm_start`` and any section replaced."""
    path = write_tiny_study_yaml(directory, name=name, n_trials=n_trials)
    data = yaml.safe_load(path.read_text())
    data["warm_start"] = warm_start
    for section, value in sections.items():
        data[section] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _queued(study) -> dict[str, dict]:
    """reference label -> the parameters its WAITING trial was enqueued with."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return {t.user_attrs["reference_config"]: t.system_attrs["fixed_params"] for t in waiting}


# -- 1. warm start, no training ---------------------------------------------------------------


# study.ask() pops the queued trials outside Study.optimize: Optuna warns that heartbeats want optimize
asks_outside_optimize = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")


@asks_outside_optimize
def test_warm_start_queues_the_three_report_configurations_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = load_study_config(_yaml(tmp_path, name="warm"))
    assert config.warm_start and set(config.search_space) == set(DEMO_SPACE)
    study = open_study(config)

    search.study.warm_start(study, config)
    search.study.warm_start(study, config)  # a second worker, or a continued study: queues nothing

    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.WAITING] * 3
    assert sorted(t.user_attrs.get("reference_config") for t in trials) == LABELS
    expected = {label: {k: v for k, v in values.items() if k in DEMO_SPACE} for label, values in REPORT.items()}
    assert _queued(study) == expected  # restricted to the searched keys: no label_smoothing, epochs
    queued_logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warm start: queued")]
    assert queued_logs == ["warm start: queued 3 reference configurations (report Exp1-3)"]

    # A reference trial that has run (no longer WAITING) is not queued again either.
    trial = study.ask()
    assert trial.number == 0 and trial.user_attrs["reference_config"] == "exp1_baseline"
    params = suggest(trial, config.search_space, dataclasses.asdict(config.training))
    assert params == expected["exp1_baseline"]
    study.tell(trial, [0.75, 0.25, 0.5])
    search.study.warm_start(study, config)
    assert len(study.get_trials(deepcopy=False)) == 3


def test_without_warm_start_nothing_is_queued(tmp_path):
    config = load_study_config(_yaml(tmp_path, name="cold", warm_start=False))
    study = open_study(config)
    search.study.warm_start(study, config)
    assert study.get_trials(deepcopy=False) == []


@asks_outside_optimize
def test_reference_values_outside_the_search_space_are_left_to_the_sampler(tmp_path, caplog):
    """search/space.py enqueue_reference_configs: a value outside the study's range is left out of
    that configuration (the sampler draws it), the configuration is still queued, and an INFO line
    names the keys left out. Range ends are inside."""
    caplog.set_level(logging.INFO, logger="search.space")
    space = {
        "lr": {"low": 1.0e-5, "high": 1.0e-4, "log": True},  # excludes 3e-4 and 2e-4: left out of all three
        "weight_decay": {"low": 0.01, "high": 0.05, "log": True},  # 0.01 and 0.05 are the ends: kept
        "dropout": {"low": 0.12, "high": 0.3},  # excludes Exp1's 0.1
        "gate_init_bias": {"choices": [0.0, 0.5]},  # only Exp3's 0.0 is a choice
        "warmup_epochs": {"low": 0, "high": 3},  # an integer key: 3, 2, 3 kept
        "num_epochs": {"low": 4, "high": 8},  # excludes 30 and 25
    }
    config = load_study_config(_yaml(tmp_path, name="narrow", search_space=space))
    study = open_study(config)
    search.study.warm_start(study, config)

    assert len(study.get_trials(deepcopy=False)) == 3  # no configuration skipped, none clipped
    assert _queued(study) == {
        "exp1_baseline": {"weight_decay": 0.01, "warmup_epochs": 3},
        "exp2_fairness_boost": {"weight_decay": 0.05, "dropout": 0.2, "warmup_epochs": 2},
        "exp3_balanced_recovery": {"weight_decay": 0.01, "dropout": 0.15, "gate_init_bias": 0.0, "warmup_epochs": 3},
    }
    left_out = {}
    for record in caplog.records:
        if match := re.fullmatch(r"warm start (\S+): (.+) outside the search space, left to the sampler", record.getMessage()):
            left_out[match[1]] = match[2].split(", ")
    assert {label: sorted(keys) for label, keys in left_out.items()} == {
        "exp1_baseline": ["dropout", "gate_init_bias", "lr", "num_epochs"],
        "exp2_fairness_boost": ["gate_init_bias", "lr", "num_epochs"],
        "exp3_balanced_recovery": ["lr", "num_epochs"],
    }

    # Run as trials, the keys left out are drawn inside the study's ranges; the others are the report's.
    defaults = dataclasses.asdict(config.training)
    for _ in range(3):
        trial = study.ask()
        label = trial.user_attrs["reference_config"]
        params = suggest(trial, config.search_space, defaults)
        assert 1e-5 <= params["lr"] <= 1e-4 and 4 <= params["num_epochs"] <= 8 and 0.12 <= params["dropout"] <= 0.3
        assert params["gate_init_bias"] in (0.0, 0.5)
        assert {k: params[k] for k in ("weight_decay", "warmup_epochs")} == {k: REPORT[label][k] for k in ("weight_decay", "warmup_epochs")}
        if label != "exp1_baseline":
            assert params["dropout"] == REPORT[label]["dropout"]


@asks_outside_optimize
def test_a_reference_value_off_a_stepped_grid_is_left_to_the_sampler(tmp_path, recwarn):
    space = {"lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
             "dropout": {"low": 0.0, "high": 0.2, "step": 0.2}}  # the grid 0.0, 0.2: Exp1's 0.1 and Exp3's 0.15 are not on it
    config = load_study_config(_yaml(tmp_path, name="stepped", search_space=space))
    study = open_study(config)
    search.study.warm_start(study, config)
    defaults = dataclasses.asdict(config.training)
    dropouts = {}
    for _ in range(3):
        trial = study.ask()
        dropouts[trial.user_attrs["reference_config"]] = suggest(trial, config.search_space, defaults)["dropout"]
    assert dropouts["exp2_fairness_boost"] == 0.2  # on the grid: the report's value
    assert dropouts["exp1_baseline"] in (0.0, 0.2) and dropouts["exp3_balanced_recovery"] in (0.0, 0.2)
    assert not [w for w in recwarn if "Fixed parameter" in str(w.message)]


# -- 2. warm start through the command line ------------------------------------------------------


def test_optimize_warm_start_runs_the_report_configurations_first(tmp_path, request):
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))  # the next tests' count back
    torch.set_num_threads(1)
    path = _yaml(tmp_path, name="warm_cli", warm_start=False)  # the flag alone turns it on
    assert run_study.main(["-q", "optimize", "--study", str(path), "--warm-start", "--n-trials", "3"]) == 0
    config = load_study_config(path)
    study = open_study(config, create=False)
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["reference_config"] for t in trials) == LABELS
    for trial in trials:
        reference = REPORT[trial.user_attrs["reference_config"]]
        assert trial.params == {k: reference[k] for k in DEMO_SPACE}
        trained = trial.user_attrs["training"]  # what the trial trained with
        assert {k: trained[k] for k in DEMO_SPACE} == {k: reference[k] for k in DEMO_SPACE}
        # keys outside the search space are the YAML's, not the report's
        assert (trained["num_epochs"], trained["warmup_epochs"], trained["label_smoothing"]) == (
            config.training.num_epochs, config.training.warmup_epochs, config.training.label_smoothing)


# -- 3. the time budget -----------------------------------------------------------------------------


class _Clock:
    """search.workers' ``time`` module with a monotonic clock that moves only when a trial runs
    (``TRIAL_SECONDS`` per trial): no test waits on the real clock."""

    TRIAL_SECONDS = 100.0

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def _objective(clock: _Clock, ran: list):
    """A stand-in for TrialObjective: samples the trial (as the real one does), takes
    ``TRIAL_SECONDS`` on ``clock`` and finishes, without training."""

    class TakesTrialSeconds:
        def __init__(self, config, prepared) -> None:
            self.config = config

        def __call__(self, trial):
            suggest(trial, self.config.search_space, dataclasses.asdict(self.config.training))
            ran.append(trial.number)
            clock.now += clock.TRIAL_SECONDS
            values = dict(zip(self.config.metric_names, (0.75, 0.25, 0.5)))
            for metric, value in values.items():  # what the dashboard's study plots read
                trial.set_user_attr(f"val_{metric}", value)
            trial.set_user_attr("degenerate", False)
            return list(values.values())

    return TakesTrialSeconds


@pytest.mark.parametrize("given_by", ["option", "yaml"])
def test_a_timeout_stops_starting_trials_and_a_later_optimize_continues(tmp_path, monkeypatch, capsys, caplog, given_by):
    caplog.set_level(logging.INFO)
    clock, ran = _Clock(), []
    monkeypatch.setattr(search.workers, "time", clock)
    monkeypatch.setattr(search.study, "TrialObjective", _objective(clock, ran))
    budget = {"n_trials": 3} | ({"timeout": 60} if given_by == "yaml" else {})
    path = _yaml(tmp_path, name=f"timeout_{given_by}", warm_start=False, budget=budget)
    timeout = ["--timeout", "60"] if given_by == "option" else []

    # The deadline (60 s) passes during the first trial (100 s): that trial finishes, no other starts.
    assert run_study.main(["-q", "optimize", "--study", str(path), *timeout]) == 1
    assert "optimize: the study has 1 of its 3 finished trials" in capsys.readouterr().err
    assert "timeout: not starting another trial" in [r.getMessage() for r in caplog.records if r.name == "search.workers"]
    assert ran == [0]
    config = load_study_config(path)
    first = open_study(config, create=False).get_trials(deepcopy=False)
    assert [(t.number, t.state) for t in first] == [(0, TrialState.COMPLETE)]

    # The deadline is per invocation: the next optimize starts its own 60 s and continues the study.
    caplog.clear()
    assert run_study.main(["-q", "optimize", "--study", str(path), *timeout, "--n-trials", "2"]) == 0
    assert "timeout: not starting another trial" not in caplog.text
    assert ran == [0, 1]
    trials = open_study(config, create=False).get_trials(deepcopy=False)
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert (trials[0].params, trials[0].values, trials[0].datetime_complete) == (first[0].params, first[0].values, first[0].datetime_complete)


def test_reference_configurations_a_timeout_left_queued_run_in_the_next_optimize(tmp_path, monkeypatch, capsys):
    clock, ran = _Clock(), []
    monkeypatch.setattr(search.workers, "time", clock)
    monkeypatch.setattr(search.study, "TrialObjective", _objective(clock, ran))
    path = _yaml(tmp_path, name="warm_timeout", budget={"n_trials": 3, "timeout": 60})

    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 1
    assert "the study has 1 of its 3 finished trials" in capsys.readouterr().err
    config = load_study_config(path)
    trials = open_study(config, create=False).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.WAITING, TrialState.WAITING]
    assert sorted(t.user_attrs["reference_config"] for t in trials) == LABELS

    # twice more: one trial per run under the 60 s budget; nothing queued again, nothing lost
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 1
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 0
    assert ran == [0, 1, 2]
    trials = open_study(config, create=False).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for trial in trials:
        reference = REPORT[trial.user_attrs["reference_config"]]
        assert trial.params == {k: reference[k] for k in DEMO_SPACE}
