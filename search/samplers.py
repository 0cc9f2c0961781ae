"""Sampler registry. Every sampler models lr, weight_decay, lambda_fair and sinkhorn_blur jointly
(GP natively; TPE with ``multivariate=True``, which Optuna 5 leaves off for multi-objective), and
every one sees the ``degenerate`` constraint through ``constraints_func``, which Optuna stores in
the trial's system attributes where optuna-dashboard 0.21 reads it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Callable

import optuna
from optuna.samplers._base import _process_constraints_after_trial
from optuna.trial import FrozenTrial, TrialState

from search.config import SamplerConfig

DEGENERATE_ATTR = "degenerate"


def degenerate_constraint(trial: FrozenTrial) -> Sequence[float]:
    """Feasible iff <= 0: a trial stopped in the degenerate phase violates it by 1."""
    return [1.0 if trial.user_attrs.get(DEGENERATE_ATTR, False) else -1.0]


class ConstrainedRandomSampler(optuna.samplers.RandomSampler):
    """Random search that records the same constraint as the others, so that its Pareto front
    (and the benchmark's hypervolume) leaves degenerate trials out in the same way."""

    def __init__(self, *, seed: int | None = None, constraints_func: Callable[[FrozenTrial], Sequence[float]]) -> None:
        super().__init__(seed=seed)
        self._constraints_func = constraints_func

    def after_trial(self, study, trial, state: TrialState, values) -> None:
        _process_constraints_after_trial(self._constraints_func, study, trial, state)
        super().after_trial(study, trial, state, values)


def _gp(c: SamplerConfig) -> optuna.samplers.BaseSampler:
    # Optuna counts n_startup_trials over COMPLETE trials: asked 8 at a time (--fuse 8, or 8
    # workers) with 10 startup trials, the model's first trial is the 17th (the random phase is
    # rounded up to whole batches; 16 startup trials give the same study). Counting running
    # trials too, so that it is the 11th, was measured and was worse (trials 11-16 then came
    # from a model of 8 points): bench/results/sampler_efficiency_batch8_startup10*.md.
    return optuna.samplers.GPSampler(seed=c.seed, n_startup_trials=c.n_startup_trials, constraints_func=degenerate_constraint)


def _tpe(c: SamplerConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(
        seed=c.seed, n_startup_trials=c.n_startup_trials, multivariate=True, constant_liar=True,
        constraints_func=degenerate_constraint,
    )


def _nsga2(c: SamplerConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=c.seed, population_size=c.population_size, constraints_func=degenerate_constraint)


def _random(c: SamplerConfig) -> optuna.samplers.BaseSampler:
    return ConstrainedRandomSampler(seed=c.seed, constraints_func=degenerate_constraint)


SAMPLERS: dict[str, Callable[[SamplerConfig], optuna.samplers.BaseSampler]] = {
    "gp": _gp,
    "tpe": _tpe,
    "nsga2": _nsga2,
    "random": _random,
}


def build_sampler(config: SamplerConfig) -> optuna.samplers.BaseSampler:
    try:
        factory = SAMPLERS[config.name]
    except KeyError:
        raise ValueError(f"sampler.name: unknown sampler {config.name!r}; valid: {', '.join(SAMPLERS)}") from None
    with warnings.catch_warnings():
        # Optuna 5.0 deprecates constraints_func (removal in 7.0) for trial.set_constraint, but
        # optuna-dashboard 0.21 shows only the list form that constraints_func writes.
        warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
        return factory(config)
