"""Every sampler: models the parameters jointly and records the degenerate constraint so that
infeasible trials stay off the Pareto front. Runs on an analytic objective (no training)."""

from types import SimpleNamespace

import optuna
import pytest

from search.config import SamplerConfig
from search.samplers import SAMPLERS, build_sampler, degenerate_constraint

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


def _suggest_pair(trial: optuna.Trial) -> None:
    trial.suggest_float("lr", 1e-5, 1e-3, log=True)
    trial.suggest_float("lambda_fair", 1e-2, 1.0, log=True)


def _modelled(storage, trial) -> bool:
    """GPSampler writes the parameters its model chose to these system attributes; a random
    startup draw writes none."""
    return any(key.startswith("gp:relative_params") for key in storage.get_trial_system_attrs(trial._trial_id))


@pytest.mark.filterwarnings("ignore:.*constraints_func.*:FutureWarning")
@pytest.mark.parametrize("counted", ["started", "complete (optuna's own)"])
def test_gp_startup_counts_started_trials_so_a_batch_does_not_extend_it(counted):
    """A fused worker asks K trials before telling any. With 4 startup trials, 2 complete and
    2 running (with their parameters), the 5th trial is the model's: counted over complete
    trials only (Optuna's GPSampler), it would still be random."""
    if counted == "started":
        sampler = build_sampler(SamplerConfig(name="gp", seed=0, n_startup_trials=4))
    else:
        sampler = optuna.samplers.GPSampler(seed=0, n_startup_trials=4, constraints_func=degenerate_constraint)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    for _ in range(2):
        trial = study.ask()
        _suggest_pair(trial)
        trial.set_user_attr("degenerate", False)
        study.tell(trial, [0.7 + 0.1 * trial.params["lambda_fair"], trial.params["lambda_fair"], trial.params["lr"] * 1e3])
    running = []
    for _ in range(3):
        running.append(study.ask())
        _suggest_pair(running[-1])
    modelled = [_modelled(study._storage, t) for t in running]
    assert modelled[:2] == [False, False]  # 2 and then 3 trials started before them: still startup
    assert modelled[2] is (counted == "started")


@pytest.mark.filterwarnings("ignore:.*constraints_func.*:FutureWarning")
def test_gp_one_trial_at_a_time_samples_exactly_what_optunas_gp_does():
    """Serially the started and complete counts agree, so the study is Optuna's GPSampler's."""
    def run(sampler):
        study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
        study.optimize(analytic, n_trials=9)
        return [(t.params, _modelled(study._storage, t)) for t in study.trials]

    ours = run(build_sampler(SamplerConfig(name="gp", seed=3, n_startup_trials=4)))
    optunas = run(optuna.samplers.GPSampler(seed=3, n_startup_trials=4, constraints_func=degenerate_constraint))
    assert [modelled for _, modelled in ours] == [False] * 4 + [True] * 5
    assert ours == optunas
