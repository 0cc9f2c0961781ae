"""The search space is data in the study YAML; this turns it into ``trial.suggest_*`` calls."""

from __future__ import annotations

import logging
from typing import Any

import optuna

from search.config import ParamSpec

log = logging.getLogger(__name__)

# The three hand-tuned runs of the reference report (seed 002), enqueued by `warm_start: true`.
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "exp1_baseline": dict(lr=3e-4, weight_decay=0.01, warmup_epochs=3, num_epochs=30, dropout=0.1, label_smoothing=0.0,
                          lambda_fair=0.05, sinkhorn_blur=1e-4, gate_init_bias=1.0),
    "exp2_fairness_boost": dict(lr=2e-4, weight_decay=0.05, warmup_epochs=2, num_epochs=25, dropout=0.2, label_smoothing=0.1,
                                lambda_fair=0.5, sinkhorn_blur=1e-3, gate_init_bias=1.0),
    "exp3_balanced_recovery": dict(lr=3e-4, weight_decay=0.01, warmup_epochs=3, num_epochs=30, dropout=0.15, label_smoothing=0.1,
                                   lambda_fair=0.15, sinkhorn_blur=1e-4, gate_init_bias=0.0),
}


def _is_int(default: Any) -> bool:
    return isinstance(default, int) and not isinstance(default, bool)


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec], defaults: dict[str, Any]) -> dict[str, Any]:
    """Sample every parameter of ``space``; integer training keys get ``suggest_int``."""
    params = {}
    for name, spec in space.items():
        if spec.choices is not None:
            params[name] = trial.suggest_categorical(name, spec.choices)
        elif _is_int(defaults[name]):
            step = 1 if spec.step is None else int(spec.step)
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high), step=step, log=spec.log)
        else:
            params[name] = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return params


def in_space(value: Any, spec: ParamSpec) -> bool:
    """Whether the sampler could draw ``value``: one of the choices, or in the range and on its
    step grid (Optuna runs an off-grid fixed value with only a warning)."""
    if spec.choices is not None:
        return value in spec.choices
    if not spec.low <= value <= spec.high:
        return False
    if spec.step is None:
        return True
    steps = (value - spec.low) / spec.step
    return abs(steps - round(steps)) < 1e-8  # Optuna's own tolerance for a stepped FloatDistribution


def enqueue_reference_configs(study: optuna.Study, space: dict[str, ParamSpec]) -> int:
    """Queue Exp1-3 (restricted to the searched parameters) unless the study already holds them.

    Values outside the study's ranges are left to the sampler rather than forced in, so a demo
    with a short schedule still gets the report's lr/wd/lambda/blur combinations.
    """
    queued = 0
    existing = {t.user_attrs.get("reference_config") for t in study.get_trials(deepcopy=False)}
    for label, reference in REFERENCE_CONFIGS.items():
        if label in existing:
            continue
        params = {k: v for k, v in reference.items() if k in space and in_space(v, space[k])}
        skipped = sorted(k for k in reference if k in space and k not in params)
        if skipped:
            log.info("warm start %s: %s outside the search space, left to the sampler", label, ", ".join(skipped))
        study.enqueue_trial(params, user_attrs={"reference_config": label})
        queued += 1
    return queued
