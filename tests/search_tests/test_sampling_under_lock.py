"""Workers that ask for trials at the same moment: each one's parameters are sampled and stored
while it holds the study lock, so the next worker's sampler sees them (search/workers.py)."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search import load_study_config, open_study
from search.space import suggest
from search.workers import TrialBudget
from test_search_e2e import tiny_study_yaml


def run_one_trial(study: optuna.Study, config, objective) -> None:
    """One trial as a worker of search.study.optimize runs it: claim, optimize, release."""
    budget = TrialBudget(study, config, 50)
    assert budget.next_trial()
    try:
        study.optimize(budget.wrap(objective), n_trials=1)
    finally:
        budget.release()


@pytest.mark.parametrize("sampler", ["gp", "tpe"])
def test_the_second_worker_sees_the_first_ones_running_trial_with_its_parameters(tmp_path, sampler):
    config = load_study_config(tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name=f"lock-{sampler}", n_trials=50))
    config = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, name=sampler, n_startup_trials=4))
    space = {"lr": config.search_space["lr"], "weight_decay": config.search_space["weight_decay"]}
    config = dataclasses.replace(config, search_space=space)
    first = open_study(config)
    for i in range(6):  # finished trials, so that the model (not the random start-up) samples
        params = {"lr": 1e-4 * (1 + i), "weight_decay": 1e-3 * (1 + i)}
        first.add_trial(create_trial(
            params=params, distributions={k: FloatDistribution(s.low, s.high, log=True) for k, s in space.items()},
            values=[0.6 + 0.05 * i, 0.3 - 0.02 * i, 1.0 - 0.05 * i], user_attrs={"degenerate": False},
            system_attrs={"constraints": [-1.0]}))
    second = open_study(config)  # another worker: its own Study object, the same storage and seed

    seen: dict[str, dict] = {}

    defaults = dataclasses.asdict(config.training)

    def worker_b(trial: optuna.Trial) -> list[float]:
        seen["b"] = suggest(trial, space, defaults)  # as search.objective.start_trial does
        return [0.5, 0.5, 1.0]

    def worker_a(trial: optuna.Trial) -> list[float]:
        # the first worker's claim is over: its parameters are in the storage already, before its
        # own objective asks for them (Optuna would sample them only at the first suggest call)
        running = [t for t in second.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        seen["a"] = dict(running[0].params)
        run_one_trial(second, config, worker_b)
        assert suggest(trial, space, defaults) == seen["a"]
        return [0.5, 0.5, 1.0]

    run_one_trial(first, config, worker_a)
    assert set(seen["a"]) == set(space)
    # seeing the running trial with its parameters, the second worker's sampler (same seed, same
    # six finished trials) accounts for it and draws another point (GP: q-batch acquisition; TPE:
    # constant liar)
    assert seen["b"] != seen["a"]
    states = [t.state for t in first.get_trials()]
    assert states.count(TrialState.COMPLETE) == 8
