"""Fused trial batches: claim K trials, train them in one fused pass, tell K results.

``optimize_fused`` is ``search.optimize`` for a device that trains K trials at a time with
``model.fused.train_fused`` (one pass over the cached batches for all K; each trial's result is its
serial result up to float rounding). Every trial is recorded exactly as ``TrialObjective`` records
it (training config, seed, code version, per-epoch curve, artifacts, the ``degenerate``
constraint or PRUNED state, FAIL on divergence, the dashboard note; its ``train.log`` is its
fused group's log).

A fused process is a worker like any other (search/workers.py), so any number of them, on any
devices and nodes, may share a study with each other and with serial workers:

* it claims its K trials under the study lock, inside the shared budget (``finished + running <
  n_trials``), and samples each one's parameters there: the next trial of the batch, and every
  other worker, sees the earlier ones RUNNING with their parameters;
* ask/tell trials get no heartbeat from Optuna, so it writes them itself (``Heartbeats``): a fused
  process killed outright leaves K RUNNING trials that the next worker fails and re-queues;
* an error or Ctrl-C fails the batch's untold trials, so none stays RUNNING; after a Ctrl-C or
  SIGTERM each is first re-queued with its parameters, as a serial worker's trial is (a storage
  failing then leaves them RUNNING, for the next worker to fail and re-queue by heartbeat).

``run_study.py optimize --fuse K`` runs the study's workers (``--workers``, ``distributed.workers``)
as fused ones, on ``--devices`` round-robin.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from model.fused import fusion_key, train_fused
from search.artifacts import TrialLog, artifact_store
from search.config import SamplerConfig, StudyConfig
from search.dashboard import TrialAnnotator
from search.objective import finish_trial, start_trial
from search.storage import error_reason, requeue_interrupted
from search.study import describe_trial, finished_count, start_worker
from search.workers import INTERRUPTED, Heartbeats

log = logging.getLogger(__name__)


def optimize_fused(config: StudyConfig, *, group_size: int = 8, n_trials: int | None = None,
                   timeout: float | None = None, progress: bool = True, prepared=None,
                   study_args: str | None = None) -> optuna.Study:
    """Run the study to ``n_trials`` finished trials (default: the budget; counted over every
    worker of the study), ``group_size`` at a time; no new group starts after ``timeout``
    seconds (default: the budget's)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if advice := batching_advice(config.sampler.name, group_size):
        log.warning(advice)
    if note := random_phase_note(config.sampler, group_size):
        log.info(note)
    study, prepared, budget = start_worker(config, n_trials=n_trials, timeout=timeout, progress=progress, prepared=prepared,
                                           study_args=study_args)
    if budget is None:
        return study
    with Heartbeats(budget.storage) as heartbeats:
        batch = _Batch(study, config, prepared, heartbeats, progress)
        start = time.perf_counter()
        while batch.failed < config.budget.max_failed_trials and (slots := budget.next_slots(group_size)):
            trials: list[optuna.Trial] = []
            try:
                with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": we write them
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    for _ in range(slots):
                        trials.append(study.ask())
                        heartbeats.add(trials[-1]._trial_id)  # first: its own claim samples for seconds
                        budget.claim(trials[-1])
                budget.release()  # the lock; a Ctrl-C held back during the claim lands here
                for trial in trials:  # all before any starts: a worker killed while starting them leaves each labelled
                    budget.label(trial)
                batch.run(trials)
            except BaseException as err:  # a bad config, Ctrl-C: no trial is left RUNNING (but see requeue)
                held = budget.release(deliver=False)  # a held-back Ctrl-C waits until the trials are failed
                reason = INTERRUPTED if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
                uncopied = batch.requeue(trials, budget.max_retry) if isinstance(err, KeyboardInterrupt) else set()
                for trial in trials:
                    if trial._trial_id not in uncopied:
                        batch.tell_failed(trial, reason)
                if held:
                    signal.raise_signal(held[0])
                raise
    log.info("study %s: %d finished trials, %.1f s in this run", config.name, finished_count(study), time.perf_counter() - start)
    return study


def batching_advice(sampler: str, group_size: int) -> str | None:
    """A warning for a sampler that learns badly from trials asked K at a time, or None."""
    if sampler == "tpe" and group_size > 1:
        return (f"sampler tpe with --fuse {group_size}: asked in batches of 4 or 8, TPE did not reach random search's "
                "100-trial hypervolume within 100 trials on the demo surrogate, GP did within 29-34 "
                "(bench/results/sampler_efficiency_*batch8*.md); consider sampler: gp")
    return None


def random_phase_note(sampler: SamplerConfig, group_size: int) -> str | None:
    """How many random trials GP starts with when asked ``group_size`` at a time, or None."""
    if sampler.name != "gp" or group_size <= 1:
        return None
    # GPSampler counts n_startup_trials over COMPLETE trials at each ask, and a batch completes
    # together: the random phase is rounded up to whole batches.
    random_trials = group_size * math.ceil(sampler.n_startup_trials / group_size)
    return (f"sampler gp with --fuse {group_size}: its first {random_trials} trials are random "
            f"(n_startup_trials {sampler.n_startup_trials}, rounded up to whole batches; "
            "bench/results/sampler_efficiency_startup*_batch8.md)")


class _Batch:
    """Trains claimed trials (one fused pass per group that can share batches) and tells them.
    A trial's heartbeat stops when it is settled: told, or lost to another worker."""

    def __init__(self, study: optuna.Study, config: StudyConfig, prepared, heartbeats: Heartbeats, progress: bool) -> None:
        self.study, self.config, self.prepared, self.heartbeats, self.progress = study, config, prepared, heartbeats, progress
        self.store = artifact_store(config.artifact_dir)
        self.annotate = TrialAnnotator(config)
        self.failed = 0  # trials of this process that ended FAIL (budget.max_failed_trials)
        self.settled: set[int] = set()  # trial ids

    def run(self, trials: list[optuna.Trial]) -> None:
        run_configs: dict[int, object] = {}
        for i, trial in enumerate(trials):
            try:
                run_configs[i] = start_trial(trial, self.config)
            except Exception as err:  # this trial fails, as a serial one would; the others train
                log.exception("trial %d could not start", trial.number)
                self.tell_failed(trial, f"{type(err).__name__}: {err}")
        groups: dict[str, list[int]] = {}
        for i, run_config in run_configs.items():  # e.g. a searched batch_size splits the batch
            groups.setdefault(fusion_key(run_config), []).append(i)
        start = time.perf_counter()
        for members in groups.values():
            error = None
            with contextlib.ExitStack() as logs:
                try:
                    for i in members:  # each trial's train.log holds its whole group's log
                        logs.enter_context(TrialLog(run_configs[i].run_dir / "train.log"))
                    log.info("fused group: %s", ", ".join(f"trial index {k} = study trial {trials[i].number}" for k, i in enumerate(members)))
                    results = train_fused([run_configs[i] for i in members], self.prepared, progress=False)
                except Exception as err:  # the whole group fails; the study goes on
                    log.exception("fused group of trials %s failed", [trials[i].number for i in members])
                    error = err
            if error is not None:
                for i in members:
                    self.tell_failed(trials[i], f"{type(error).__name__}: {error}")
                continue
            for i, result in zip(members, results, strict=True):  # a missing result must not keep a trial beating
                try:
                    self._finish(trials[i], result, run_configs[i].run_dir)
                except Exception as err:  # e.g. an artifact upload: this trial fails, as a serial one would
                    log.exception("recording trial %d failed", trials[i].number)
                    self.tell_failed(trials[i], f"{type(err).__name__}: {err}")
        log.info("fused batch of %d trials: %.1f s", len(trials), time.perf_counter() - start)

    def _finish(self, trial: optuna.Trial, result, run_dir) -> None:
        try:
            outcome = finish_trial(trial, self.config, result, self.store, run_dir)
            # skip_if_finished: a FAIL written by another worker since then is not an error (see _lost)
            frozen = self.study.tell(trial, outcome.values, state=outcome.state, skip_if_finished=True)
        except UpdateFinishedTrialError:
            frozen = None
        if frozen is None or frozen.state != outcome.state:
            log.warning("trial %d was failed by another worker (its heartbeat was lost); its retry runs elsewhere", trial.number)
            self._lost(trial)
            return
        self._told(frozen)

    def requeue(self, trials: list[optuna.Trial], max_retry: int) -> set[int]:
        """Queue a copy of each interrupted trial not yet told, before ``tell_failed`` gives back
        their slots (see ``requeue_interrupted``). Returns the ids of trials to leave RUNNING: those
        not copied because the storage failed, when heartbeats let another worker fail and
        re-queue them (without heartbeats nobody would, and they are failed). Interrupted again
        meanwhile (a third signal exits at once), the rest stay RUNNING for that same recovery."""
        for k, trial in enumerate(trials):
            if trial._trial_id in self.settled:
                continue
            try:
                trial.set_user_attr("fail_reason", INTERRUPTED)
                requeue_interrupted(self.study, trial.storage.get_trial(trial._trial_id), max_retry)
            except UpdateFinishedTrialError:
                continue  # another worker failed it meanwhile (its heartbeat was late) and copied it
            except Exception as err:  # the storage unreachable, retried already: not again for each trial
                log.warning("could not re-queue the interrupted trials: %s", error_reason(err))
                if self.heartbeats.interval is None:
                    return set()
                return {t._trial_id for t in trials[k:] if t._trial_id not in self.settled}
        return set()

    def tell_failed(self, trial: optuna.Trial, reason: str) -> None:
        """End ``trial`` FAIL with ``reason``, unless it is settled already."""
        if trial._trial_id in self.settled:
            return
        try:
            trial.set_user_attr("fail_reason", reason)
            frozen = self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        except UpdateFinishedTrialError:
            self._lost(trial)
            return
        except Exception:  # the storage is gone: the trial's heartbeat stops, another worker fails it
            log.exception("could not fail trial %d", trial.number)
            self._settle(trial._trial_id)
            return
        self._told(frozen)

    def _lost(self, trial: optuna.Trial) -> None:
        """Failed by another worker: a failure of this run too, or a worker whose heartbeats never
        arrive would claim new trials forever."""
        self._settle(trial._trial_id)
        self.failed += 1

    def _told(self, frozen: optuna.trial.FrozenTrial) -> None:
        self._settle(frozen._trial_id)
        self.failed += frozen.state == TrialState.FAIL
        if self.progress:
            print(describe_trial(frozen, self.config.metric_names), flush=True)
        self.annotate(self.study, frozen)

    def _settle(self, trial_id: int) -> None:
        self.settled.add(trial_id)
        self.heartbeats.discard(trial_id)


__all__ = ["optimize_fused"]
