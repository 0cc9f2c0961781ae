"""Create or continue a study and run trials on it."""

from __future__ import annotations

import logging
import time

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from model import prepare
from search.config import StudyConfig
from search.objective import TrialDiverged, TrialObjective
from search.samplers import build_sampler
from search.space import enqueue_reference_configs

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def open_study(config: StudyConfig, *, create: bool = True) -> optuna.Study:
    """The study named in ``config`` on its storage; created (with metric names) if absent."""
    sampler = build_sampler(config.sampler)
    if not create:
        try:
            return optuna.load_study(study_name=config.name, storage=config.storage_url, sampler=sampler)
        except KeyError:
            raise ValueError(f"no study named {config.name!r} in {config.storage_url}; run `optimize` first") from None
    config.workdir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=config.name, storage=config.storage_url, sampler=sampler,
        directions=config.directions, load_if_exists=True,
    )
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in config.directions]:
        raise ValueError(f"study {config.name!r} exists with directions {[d.name.lower() for d in study.directions]}, "
                         f"the YAML asks for {config.directions}; use another --study-name")
    if study.metric_names is None:
        study.set_metric_names(config.metric_names)
    return study


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def describe_trial(trial: FrozenTrial, metric_names: list[str]) -> str:
    if trial.state == TrialState.COMPLETE:
        values = "  ".join(f"{m} {v:.4f}" for m, v in zip(metric_names, trial.values))
        note = "  INFEASIBLE (degenerate)" if trial.user_attrs.get("degenerate") else ""
    else:
        values, note = trial.state.name, f"  ({trial.user_attrs.get('stop_reason') or trial.user_attrs.get('fail_reason', '')})"
    params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"trial {trial.number:3d}: {values}{note}  epochs {trial.user_attrs.get('epochs_run', '?')}  [{params}]"


class _Progress:
    """A tqdm bar over the study's finished trials plus one summary line per trial; stops the
    worker when the study has its budget of finished trials or too many failures."""

    def __init__(self, config: StudyConfig, start_finished: int, target: int, show: bool) -> None:
        self.config, self.target, self.failed = config, target, 0
        self.bar = tqdm(total=target, initial=min(start_finished, target), desc=f"study {config.name}", unit="trial", disable=not show)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        tqdm.write(describe_trial(trial, self.config.metric_names))
        if trial.state == TrialState.FAIL:
            self.failed += 1
        done = finished_count(study)
        self.bar.n = min(done, self.target)
        self.bar.refresh()
        if done >= self.target:
            study.stop()
        elif self.failed >= self.config.budget.max_failed_trials:
            log.error("stopping: %d trials failed in this run (budget.max_failed_trials)", self.failed)
            study.stop()


def optimize(config: StudyConfig, *, n_trials: int | None = None, timeout: float | None = None,
             progress: bool = True, prepared=None) -> optuna.Study:
    """Run trials until the study has ``n_trials`` finished ones (default: the budget).

    Re-running on an existing study continues it; it never overwrites trials.
    """
    target = n_trials or config.budget.n_trials
    prepared = prepared or prepare(config.base_run_config(), progress=progress, with_test_caches=False)
    study = open_study(config)
    if config.warm_start:
        queued = enqueue_reference_configs(study, config.search_space)
        if queued:
            log.info("warm start: queued %d reference configurations (report Exp1-3)", queued)
    done = finished_count(study)
    if done >= target:
        log.info("study %s already has %d finished trials (budget %d); raise --n-trials to continue", config.name, done, target)
        return study
    objective = TrialObjective(config, prepared)
    tracker = _Progress(config, done, target, progress)
    start = time.perf_counter()
    study.optimize(
        objective,
        timeout=timeout if timeout is not None else config.budget.timeout,
        callbacks=[tracker],
        # A trial never blocks the study: a crash or divergence ends that trial FAIL and logs why.
        catch=(Exception,),
    )
    tracker.bar.close()
    log.info("study %s: %d finished trials, %.1f s in this run", config.name, finished_count(study), time.perf_counter() - start)
    return study


__all__ = ["open_study", "optimize", "finished_count", "describe_trial", "FINISHED", "TrialDiverged"]
