"""Fused trial batches: ask K trials, train them in one fused pass, tell K results.

``optimize_fused`` is ``search.optimize`` for one device that trains K trials at a time with
``model.fused.train_fused`` (one pass over the cached batches for all K; each trial's result is its
serial result up to float rounding). Every trial is recorded exactly as ``TrialObjective`` records
it (training config, seed, code version, per-epoch curve, artifacts, the ``degenerate``
constraint or PRUNED state, FAIL on divergence). The samplers see the K pending trials as RUNNING
while they suggest the next ones (TPE's constant liar, GPSampler's handling of running trials).

``run_study.py optimize --fuse K`` runs it. Limits (why it is an option, not the default): trials are asked and
told (``study.ask``/``study.tell``), so there are no heartbeats, and a worker killed mid-batch
leaves its K trials RUNNING instead of having them retried; it does not take part in
``search/workers.py``'s shared trial budget, so run it as the study's only worker.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import optuna
from optuna.trial import TrialState

from model import prepare
from model.fused import fusion_key, train_fused
from search.artifacts import artifact_store
from search.config import StudyConfig
from search.objective import finish_trial, start_trial
from search.study import describe_trial, finished_count, open_study, warm_start

log = logging.getLogger(__name__)


def optimize_fused(config: StudyConfig, *, group_size: int = 8, n_trials: int | None = None,
                   timeout: float | None = None, progress: bool = True, prepared=None) -> optuna.Study:
    """Run the study to ``n_trials`` finished trials (default: the budget), ``group_size`` at a
    time; no new group starts after ``timeout`` seconds (default: the budget's)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    target = n_trials or config.budget.n_trials
    # ask/tell trials write no heartbeats: a storage with them on would only warn at every ask
    config = dataclasses.replace(config, distributed=dataclasses.replace(config.distributed, heartbeat_interval=None, grace_period=None))
    study = open_study(config)
    prepared = prepared or prepare(config.base_run_config(), progress=progress, with_test_caches=False)
    warm_start(study, config)
    store = artifact_store(config.artifact_dir)
    failed = 0
    timeout = timeout or config.budget.timeout
    started = time.monotonic()
    while (done := finished_count(study)) < target and failed < config.budget.max_failed_trials:
        if timeout is not None and time.monotonic() - started > timeout:
            log.info("timeout of %.0f s reached: no new group of trials", timeout)
            break
        trials: list[optuna.Trial] = []
        told: set[int] = set()
        try:
            trials.extend(study.ask() for _ in range(min(group_size, target - done)))
            failed += _run_batch(study, config, trials, told, prepared, store, progress)
        except BaseException as err:  # a bad config, Ctrl-C: no trial is left RUNNING (ask/tell has no heartbeat)
            reason = "interrupted (KeyboardInterrupt)" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
            for i, trial in enumerate(trials):
                if i not in told:
                    trial.set_user_attr("fail_reason", reason)
                    study.tell(trial, state=TrialState.FAIL)
            raise
    return study


def _run_batch(study: optuna.Study, config: StudyConfig, trials: list[optuna.Trial], told: set[int], prepared, store,
               progress: bool) -> int:
    """Sample, train (one fused pass per group that can share batches) and tell ``trials``;
    ``told`` collects the ones told. Returns how many failed."""
    failed = 0
    run_configs = [start_trial(trial, config) for trial in trials]
    groups: dict[str, list[int]] = {}
    for i, run_config in enumerate(run_configs):  # e.g. a searched batch_size splits the batch
        groups.setdefault(fusion_key(run_config), []).append(i)
    start = time.perf_counter()
    for members in groups.values():
        try:
            results = train_fused([run_configs[i] for i in members], prepared, progress=False)
        except Exception as err:  # the whole group fails; the study goes on
            log.exception("fused group of trials %s failed", [trials[i].number for i in members])
            for i in members:
                trials[i].set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
                study.tell(trials[i], state=TrialState.FAIL)
                told.add(i)
            failed += len(members)
            continue
        for i, result in zip(members, results):
            outcome = finish_trial(trials[i], config, result, store, run_configs[i].run_dir)
            frozen = study.tell(trials[i], outcome.values, state=outcome.state)
            told.add(i)
            failed += outcome.state == TrialState.FAIL
            if progress:
                print(describe_trial(frozen, config.metric_names), flush=True)
    log.info("fused batch of %d trials: %.1f s", len(trials), time.perf_counter() - start)
    return failed


__all__ = ["optimize_fused"]
