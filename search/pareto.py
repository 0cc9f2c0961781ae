"""The feasible Pareto front and the ways a user picks one trial from it.

    knee                 closest to the ideal point after scaling each objective to [0, 1] over the front
    max-<metric>         e.g. max-auc: the Pareto trial with the highest validation <metric>
    min-<metric>         e.g. min-f_meo
    trial:<n>            trial number n (must be complete and feasible)
    "<metric> >= <v>"    the best-AUC Pareto trial satisfying the condition (>=, <=, >, <); parsed, never eval'd
"""

from __future__ import annotations

import operator
import re

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

import objectives

_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
PICK_HELP = "knee | max-<metric> | min-<metric> | trial:<n> | \"<metric> >= <value>\""


class PickError(ValueError):
    pass


def is_feasible(trial: FrozenTrial) -> bool:
    """COMPLETE and not degenerate (by the user attribute, or the sampler's constraint)."""
    if trial.state != TrialState.COMPLETE or trial.user_attrs.get("degenerate"):
        return False
    return all(c <= 0 for c in (trial.system_attrs.get("constraints") or []))


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The feasible Pareto front, by trial number: the feasible trials no other feasible trial
    dominates (what ``study.best_trials`` gives when the sampler wrote the constraint; this also
    holds for a study whose trials carry only the ``degenerate`` attribute)."""
    feasible = [t for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]) if is_feasible(t)]
    if not feasible:
        return []
    signs = np.array([-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in study.directions])
    values = np.array([t.values for t in feasible]) * signs  # all minimised
    dominated = [bool(np.any(np.all(values <= v, axis=1) & np.any(values < v, axis=1))) for v in values]
    return sorted((t for t, out in zip(feasible, dominated) if not out), key=lambda t: t.number)


def metric_value(trial: FrozenTrial, metric: str) -> float:
    value = trial.user_attrs.get(f"val_{metric}")
    if value is None:
        raise PickError(f"trial {trial.number} has no validation {metric!r}")
    return float(value)


def _knee(study: optuna.Study, front: list[FrozenTrial]) -> FrozenTrial:
    values = np.array([t.values for t in front], dtype=float)
    signs = np.array([-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in study.directions])
    costs = values * signs  # every column: lower is better
    span = costs.max(axis=0) - costs.min(axis=0)
    scaled = (costs - costs.min(axis=0)) / np.where(span > 0, span, 1.0)
    return front[int(np.argmin(np.linalg.norm(scaled, axis=1)))]


def pick_trial(study: optuna.Study, pick: str) -> FrozenTrial:
    """Resolve a --pick expression to one trial; PickError says what is wrong with it."""
    front = pareto_trials(study)
    pick = pick.strip().lower()  # "AUC >= 0.8", "min-f_fpr " mean what they say
    if pick.startswith("trial:"):
        number = pick.split(":", 1)[1]
        if not number.isdigit():
            raise PickError(f"--pick {pick!r}: expected trial:<number>")
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == int(number)]
        if not trials:
            raise PickError(f"--pick {pick!r}: the study has no trial {number}")
        trial = trials[0]
        if trial.state != TrialState.COMPLETE:
            raise PickError(f"--pick {pick!r}: trial {number} is {trial.state.name}, not COMPLETE")
        if trial.user_attrs.get("degenerate"):
            reason = trial.user_attrs.get("stop_reason") or "every validation prediction one class in every epoch"
            raise PickError(f"--pick {pick!r}: trial {number} is infeasible (degenerate: {reason.removeprefix('degenerate: ')})")
        return trial
    if not front:
        raise PickError("the study has no feasible complete trial yet")
    if pick == "knee":
        return _knee(study, front)
    match = re.fullmatch(r"(max|min)-([a-z_]+)", pick)
    if match:
        kind, metric = match.groups()
        _check_metric(metric, pick)
        best = (max if kind == "max" else min)(metric_value(t, metric) for t in front)
        tied = [t for t in front if metric_value(t, metric) == best]  # ties: the best AUC, then the first trial
        return max(tied, key=lambda t: (metric_value(t, "auc"), -t.number))
    match = _CONDITION.match(pick)
    if match:
        metric, op, value = match.groups()
        _check_metric(metric, pick)
        passing = [t for t in front if _OPS[op](metric_value(t, metric), float(value))]
        if not passing:
            raise PickError(f"--pick {pick!r}: no Pareto trial satisfies it")
        return max(passing, key=lambda t: (metric_value(t, "auc"), -t.number))
    raise PickError(f"--pick {pick!r}: not understood; use {PICK_HELP}")


def _check_metric(metric: str, pick: str) -> None:
    if metric not in objectives.METRIC_NAMES:
        raise PickError(f"--pick {pick!r}: unknown metric {metric!r}; valid: {', '.join(objectives.METRIC_NAMES)}")


def front_table(study: optuna.Study, params: list[str] | None = None) -> pd.DataFrame:
    """The Pareto front as a table: trial, every validation metric, best epoch, gate range, params."""
    rows = []
    for trial in pareto_trials(study):
        row = {"trial": trial.number}
        row.update({m: trial.user_attrs.get(f"val_{m}") for m in objectives.METRIC_NAMES})
        row["best_epoch"] = trial.user_attrs.get("best_epoch")
        row["gate"] = f"{trial.user_attrs.get('gate_min', float('nan')):.2f}-{trial.user_attrs.get('gate_max', float('nan')):.2f}"
        row.update({k: v for k, v in trial.params.items() if params is None or k in params})
        rows.append(row)
    return pd.DataFrame(rows)
