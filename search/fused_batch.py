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
from model.typed_config import to_dict
from search.artifacts import artifact_store, upload_trial_outputs
from search.config import StudyConfig
from search.objective import code_version, record_result, trial_run_config
from search.samplers import DEGENERATE_ATTR
from search.space import suggest
from search.study import describe_trial, finished_count, open_study, warm_start

log = logging.getLogger(__name__)


def _tell(study: optuna.Study, config: StudyConfig, trial: optuna.Trial, result, store) -> None:
    """Record and finish one trial the way TrialObjective does (attributes and artifacts first:
    a finished trial takes no more)."""
    record_result(trial, result)
    upload_trial_outputs(store, trial, result.output_dir)
    if result.status == "diverged":
        trial.set_user_attr("fail_reason", result.stop_reason)
        study.tell(trial, state=TrialState.FAIL)
        return
    degenerate = result.status == "stopped" and result.stop_reason.startswith("degenerate")
    trial.set_user_attr(DEGENERATE_ATTR, degenerate)
    if degenerate and config.stopping.record_degenerate_as == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        return
    study.tell(trial, [result.best.val[metric] for metric in config.metric_names])


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
    defaults = dataclasses.asdict(config.training)
    failed = 0
    timeout = timeout or config.budget.timeout
    started = time.monotonic()
    while (done := finished_count(study)) < target and failed < config.budget.max_failed_trials:
        if timeout is not None and time.monotonic() - started > timeout:
            log.info("timeout of %.0f s reached: no new group of trials", timeout)
            break
        trials = [study.ask() for _ in range(min(group_size, target - done))]
        run_configs = []
        for trial in trials:
            run_config = trial_run_config(config, suggest(trial, config.search_space, defaults), trial.number)
            trial.set_user_attr("training", to_dict(run_config.training))
            trial.set_user_attr("seed", run_config.training.seed)
            trial.set_user_attr("code_version", code_version())
            run_configs.append(run_config)
        groups: dict[tuple, list[int]] = {}
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
                failed += len(members)
                continue
            for i, result in zip(members, results):
                _tell(study, config, trials[i], result, store)
                frozen = study.get_trials(deepcopy=False)[trials[i].number]
                failed += frozen.state == TrialState.FAIL
                if progress:
                    print(describe_trial(frozen, config.metric_names), flush=True)
        log.info("fused batch of %d trials: %.1f s", len(trials), time.perf_counter() - start)
    return study


__all__ = ["optimize_fused"]
