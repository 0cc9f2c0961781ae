"""Every sampler: models the parameters jointly and records the degenerate constraint so that
infeasible trials stay off the Pareto front. Runs on an analytic objective (no training)."""

from types import SimpleNamespace

import optuna
import pytest

from search.config import SamplerConfig
from search.samplers import SAMPLERS, build_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def analytic(trial: optuna.Trial):
    lr = trial.suggest_float("lr", 1e-5, 1e-3, log=True)
    lam = trial.suggest_float("lambda_fair", 1e-2, 1.0, log=True)
    degenerate = lr < 3e-5  # the corner the reference report fell into
    trial.set_user_attr("degenerate", degenerate)
    auc = 0.5 if degenerate else 0.9 - 0.1 * lam
    return auc, lam, 2 * lam


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_records_the_constraint_and_front_excludes_infeasible(name):
    sampler = build_sampler(SamplerConfig(name=name, seed=0, n_startup_trials=4, population_size=4))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    study.enqueue_trial({"lr": 1e-5, "lambda_fair": 0.01})  # certainly degenerate, and dominant if counted
    study.optimize(analytic, n_trials=10)
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    # stored in the list form optuna-dashboard 0.21 reads
    assert all(list(t.system_attrs.get("constraints", [])) in ([1.0], [-1.0]) for t in trials)
    assert list(trials[0].system_attrs["constraints"]) == [1.0]
    front = study.best_trials
    assert front and all(not t.user_attrs["degenerate"] for t in front)


def test_tpe_is_multivariate_and_unknown_sampler_is_named():
    sampler = build_sampler(SamplerConfig(name="tpe"))
    assert sampler._multivariate  # Optuna 5 leaves it off by default for multi-objective
    with pytest.raises(ValueError, match="unknown sampler 'cmaes'"):
        build_sampler(SimpleNamespace(name="cmaes"))
