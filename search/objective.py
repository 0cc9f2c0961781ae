"""One Optuna trial = one full training run of the adapter model.

The trial stores what it needs to be understood and reproduced as user attributes: its full
training config, seed and code version; the best epoch's validation metrics; its per-epoch
curve (metrics, gate statistics, fair-term share); and, if it was stopped, why.

How a stopped trial is recorded teaches the sampler (Optuna 5 has no pruners for
multi-objective studies, so the training run stops itself):

* degenerate (stopped in the degenerate phase, or no epoch ever out of it),
  ``record_degenerate_as: infeasible`` -> COMPLETE with the metrics of its best epoch (the
  highest validation AUC; every epoch was degenerate) and a violated ``degenerate`` constraint
  (GP and NSGA-II learn to avoid the region; the Pareto front leaves the trial out);
* degenerate, ``record_degenerate_as: pruned`` -> PRUNED (only TPE learns from those);
* non-finite loss or validation scores -> FAIL, reason in ``fail_reason``.

A trial's values are its best epoch's: the highest validation AUC among its non-degenerate epochs
(``model.train.is_better_epoch``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import subprocess
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from model import PreparedData, TrainResult, train
from model.config import TrainRunConfig
from model.runtime import resolve_device
from model.typed_config import to_dict
from search.artifacts import TrialLog, artifact_store, upload_trial_outputs
from search.config import StudyConfig
from search.samplers import DEGENERATE_ATTR
from search.space import suggest

log = logging.getLogger(__name__)


class TrialDiverged(RuntimeError):
    """The run's loss became NaN/inf; the trial ends FAIL with the reason stored."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of this checkout (with '+dirty' when it has local changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def trial_run_config(study: StudyConfig, params: dict, trial_number: int) -> TrainRunConfig:
    base = study.base_run_config().with_training(**params)
    return dataclasses.replace(base, output_dir=study.workdir / "trials" / study.name / f"trial-{trial_number:05d}")


def curve_attr(result: TrainResult) -> list[dict]:
    """The per-epoch curve, compact enough for a user attribute (JSON in the storage)."""
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.flat().items()} for r in result.epochs]


def record_result(trial: optuna.Trial, result: TrainResult) -> None:
    trial.set_user_attr("status", result.status)
    trial.set_user_attr("epochs_run", len(result.epochs))
    trial.set_user_attr("curve", curve_attr(result))
    trial.set_user_attr("val_groups_without_real", result.val_groups_without_real)  # out of the FPR terms
    trial.set_user_attr("val_groups_without_fake", result.val_groups_without_fake)  # out of the TPR terms
    if result.stop_reason:
        trial.set_user_attr("stop_reason", result.stop_reason)
        trial.set_user_attr("stopped_epoch", len(result.epochs))
    best = result.best
    if best is not None:
        trial.set_user_attr("best_epoch", best.epoch)
        for metric, value in best.val.items():
            trial.set_user_attr(f"val_{metric}", value)
        # the gate of the model the trial stands for (its best epoch: what a retrained export
        # reports), and its range over the whole run for the note
        trial.set_user_attr("gate_mean", best.gate_mean)
        trial.set_user_attr("gate_min", best.gate_min)
        trial.set_user_attr("gate_max", best.gate_max)
        trial.set_user_attr("gate_min_run", min(r.gate_min for r in result.epochs))
        trial.set_user_attr("gate_max_run", max(r.gate_max for r in result.epochs))
        trial.set_user_attr("fair_share", best.fair_share)
    if result.output_dir is not None:
        trial.set_user_attr("output_dir", str(result.output_dir))


class TrialObjective:
    """The callable handed to ``study.optimize``: sample, train, record, return the objectives."""

    def __init__(self, study_config: StudyConfig, prepared: PreparedData) -> None:
        self.config = study_config
        self.prepared = prepared
        self.store = artifact_store(study_config.artifact_dir)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        try:
            return self._run(trial)
        except (optuna.TrialPruned, TrialDiverged):
            raise
        except Exception as err:  # recorded, then re-raised for study.optimize(catch=...) to log
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
            raise

    def _run(self, trial: optuna.Trial) -> list[float]:
        run_config = start_trial(trial, self.config)
        with TrialLog(run_config.run_dir / "train.log"):
            result = train(run_config, prepared=self.prepared, progress=False)
        outcome = finish_trial(trial, self.config, result, self.store, run_config.run_dir)
        if outcome.state == TrialState.FAIL:
            raise TrialDiverged(outcome.reason)
        if outcome.state == TrialState.PRUNED:
            raise optuna.TrialPruned(outcome.reason)
        return outcome.values


def start_trial(trial: optuna.Trial, config: StudyConfig) -> TrainRunConfig:
    """Sample the trial's parameters and record what reproduces it, before it trains."""
    params = suggest(trial, config.search_space, dataclasses.asdict(config.training))
    run_config = trial_run_config(config, params, trial.number)
    trial.set_user_attr("training", to_dict(run_config.training))
    trial.set_user_attr("seed", run_config.training.seed)
    trial.set_user_attr("code_version", code_version())
    trial.set_user_attr("torch_threads", torch.get_num_threads())  # CPU results depend on it (rounding, which training carries along)
    trial.set_user_attr("device", str(resolve_device(run_config.training.device)))  # what "auto" meant here
    return run_config


@dataclasses.dataclass(frozen=True)
class TrialOutcome:
    """How a trained trial ends: the state to tell Optuna, the objective values when COMPLETE."""

    state: TrialState
    values: list[float] | None = None
    reason: str | None = None


def finish_trial(trial: optuna.Trial, config: StudyConfig, result: TrainResult, store, run_dir: Path) -> TrialOutcome:
    """Record a training run on its trial (attributes and artifacts first: a finished trial takes
    no more) and decide how the trial ends (see the module docstring)."""
    record_result(trial, result)
    upload_trial_outputs(store, trial, run_dir)
    if result.status == "diverged":
        trial.set_user_attr("fail_reason", result.stop_reason)
        return TrialOutcome(TrialState.FAIL, reason=result.stop_reason)
    # Stopped in its degenerate phase, or never out of it: the metrics are those of a model that
    # predicts one class (every fairness gap 0), so the trial must not reach the Pareto front.
    degenerate = result.degenerate
    trial.set_user_attr(DEGENERATE_ATTR, degenerate)
    if degenerate and config.stopping.record_degenerate_as == "pruned":
        return TrialOutcome(TrialState.PRUNED, reason=result.stop_reason or "degenerate: every validation prediction was one class in every epoch")
    return TrialOutcome(TrialState.COMPLETE, [result.best.val[metric] for metric in config.metric_names])
