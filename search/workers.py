"""Many workers, one study: Optuna's own distributed mode, no scheduler of ours.

A worker is one ``run_study.py optimize`` process; any number of them, on any nodes, share a
study through its storage URL. ``--workers K`` starts K of them on this node (search/local_workers.py),
each pinned to one device. Every worker runs the same loop (:class:`TrialBudget`, used by
``search.study.optimize``)::

    take the study lock -> fail dead workers' trials (re-queue them) -> count -> start one or not

**The budget across workers.** ``budget.n_trials`` counts FINISHED (complete or pruned) trials of
the whole study, so "each worker runs n trials" would overshoot. A worker may start a trial only
while ``finished + running < n_trials``, and it counts and creates the trial (``study.ask``) while
holding the study lock, recording the new trial's first heartbeat before letting go: two workers
can never both take the last slot, because when the lock is released the new trial is already
RUNNING and the next worker counts it. WAITING trials are not counted: ``study.ask`` pops them
before it creates a new trial, so a re-queued trial of a dead worker (or a warm-start trial) takes
the free slot and is run. A trial that fails gives its slot back. When ``finished + running``
reaches the budget but ``finished`` does not, a worker waits and polls instead of exiting: a
running trial may belong to a dead worker, and only a live worker can fail it (heartbeat) and run
its retry. So the study ends with exactly ``n_trials`` finished trials. (Without heartbeats a
worker exits instead of waiting, and a dead worker's trial is lost.)

A fused worker (``--fuse K``, search/fused_batch.py) takes up to K free slots at once
(``next_slots``), asks and claims its K trials under the same lock, and writes their heartbeats
from a thread (``Heartbeats``) while they train: to the other workers it is K workers.

Each worker also gets its own sampler seed (``sampler.seed`` + the number of workers that joined
the study before it), or K workers would draw the same "random" trials.

**Sampling under the lock.** Optuna samples a trial's parameters lazily, at its first
``suggest_*`` call, and only then writes them to the storage. The claim therefore also samples
them (``search.space.suggest``) before it lets go of the lock: the next worker's sampler then
sees this trial RUNNING with its parameters. GPSampler conditions on such trials (its q-batch
acquisition) and TPE's constant liar on them; sampled outside the lock, two workers that finish
at the same moment would fit the same model to the same trials, both seconds long, and draw
(nearly) the same point. Sampling is therefore serial across a study's workers: ~1-3 s of GP
fitting per trial, against minutes of GPU training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from search.config import StudyConfig
from search.samplers import build_sampler
from search.space import suggest
from search.storage import error_reason, fail_dead_trials, requeue_interrupted, storage_of
from search.study_lock import study_lock

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SESSIONS_ATTR = "worker_sessions"  # study user attribute: how many workers have joined the study
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"  # fail_reason of a trial whose worker was stopped


class TrialBudget:
    """The per-worker gate described in the module docstring."""

    def __init__(self, study: optuna.Study, config: StudyConfig, target: int, *, timeout: float | None = None) -> None:
        self.study, self.target = study, target
        self.storage = storage_of(study)
        if self.storage is None:
            raise ValueError("the study storage must be an RDB storage (an SQLAlchemy URL)")
        self.lock = study_lock(self.storage, config.name, fallback_dir=config.workdir)
        self.heartbeats = self.storage.get_heartbeat_interval() is not None
        # Waiting for the last running trials: poll every second at first, then back off to 10 s.
        self.max_poll = float(min(10, self.storage.get_heartbeat_interval() or 10))
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.device, self.sampler = config.training.device, config.sampler
        self.max_retry = config.distributed.max_retry
        self.space, self.defaults = config.search_space, dataclasses.asdict(config.training)
        self.current: int | None = None  # trial id of the running trial of this worker
        self.interrupted = False  # a Ctrl-C / SIGTERM reached the objective
        self._saved_handlers: dict | None = None
        self._deferred: list[int] = []
        self._waiting_for: tuple[int, ...] | None = None

    def join(self) -> int:
        """Register this worker with the study and give its sampler its own seed (``sampler.seed``
        + the workers that joined before it); returns how many joined before it."""
        with self.lock:
            sessions = int(self.study.user_attrs.get(SESSIONS_ATTR, 0))
            self.study.set_user_attr(SESSIONS_ATTR, sessions + 1)
        if sessions and self.sampler.seed is not None:  # one seed: K workers would draw the same trials
            self.study.sampler = build_sampler(dataclasses.replace(self.sampler, seed=self.sampler.seed + sessions))
        return sessions

    def next_trial(self) -> bool:
        """Block until this worker should start a trial (True; the study lock is then held until
        the trial exists) or the study is done or the timeout passed (False)."""
        return self.next_slots(1) > 0

    def next_slots(self, wanted: int) -> int:
        """Block until this worker may start up to ``wanted`` trials: returns how many (the study
        lock is then held until they exist), or 0 when the study is done or the timeout passed."""
        poll = 1.0
        while True:
            self.lock.acquire()
            # Held back from here: between failing a dead worker's trial and queueing its copy, an
            # interrupt would lose the copy.
            self._defer_interrupts()
            try:
                dead = fail_dead_trials(self.study, self.storage)
                if dead:
                    log.warning("failed the trial(s) %s of dead worker(s)", ", ".join(map(str, dead)))
                trials = self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                finished = sum(t.state in FINISHED for t in trials)
                running = tuple(t.number for t in trials if t.state == TrialState.RUNNING)
                if finished >= self.target:
                    self.release()
                    return 0
                if self._expired():
                    self.release()
                    log.info("timeout: not starting another trial")
                    return 0
                free = self.target - finished - len(running)
                if free > 0:
                    self._waiting_for = None
                    return min(wanted, free)  # lock held: released once the trials exist (claim, then release)
            except BaseException:
                self.release()
                raise
            self.release()
            if not self.heartbeats:
                log.info("budget taken: %d finished + %d running elsewhere (no heartbeats: not waiting for them)", finished, len(running))
                return 0
            if running != self._waiting_for:
                log.info("budget taken: %d finished + running trial(s) %s; waiting in case one fails", finished, ", ".join(map(str, running)))
                self._waiting_for, poll = running, 1.0
            time.sleep(min(poll, self.max_poll))
            poll *= 1.5

    def claim(self, trial: optuna.Trial) -> None:
        """The claim of a new trial, under the lock: its first heartbeat, its parameters sampled
        and stored (see "Sampling under the lock")."""
        if self.heartbeats:
            self.storage.record_heartbeat(trial._trial_id)
        suggest(trial, self.space, self.defaults)  # the objective's own suggest calls then return these

    def label(self, trial: optuna.Trial) -> None:
        """Which worker runs ``trial``, on which device (trial attributes)."""
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("device", self.device)

    def wrap(self, objective: Callable[[optuna.Trial], object]) -> Callable[[optuna.Trial], object]:
        """``objective`` preceded by the claim's end: first heartbeat, the parameters sampled and
        stored (see "Sampling under the lock"), lock release, worker attrs."""

        def claimed(trial: optuna.Trial) -> object:
            self.current = trial._trial_id
            try:
                self.claim(trial)
            finally:
                self.lock.release()
            try:
                self._restore_interrupts()  # a Ctrl-C during the claim lands here: the trial ends FAIL
                self.label(trial)
                return objective(trial)
            except KeyboardInterrupt:
                self.interrupted = True
                with contextlib.suppress(Exception):  # the storage unreachable: failed by heartbeat, re-queued then
                    trial.set_user_attr("fail_reason", INTERRUPTED)
                    # before Optuna fails it and so frees its slot: see requeue_interrupted
                    requeue_interrupted(self.study, self.storage.get_trial(trial._trial_id), self.max_retry)
                raise

        return claimed

    def release(self, *, deliver: bool = True) -> list[int]:
        """Let go of the lock and restore the signal handlers. A Ctrl-C / SIGTERM held back since
        ``next_slots`` is delivered now, or with ``deliver=False`` returned (the caller first
        fails its trials, then delivers it)."""
        self.lock.release()
        return self._restore_interrupts(deliver=deliver)

    def _defer_interrupts(self) -> None:
        """Hold Ctrl-C / SIGTERM from taking the study lock (dead workers' trials are failed and
        copied then) until the new trial exists with its first heartbeat (``study.ask`` can take
        seconds): interrupted in between, the new trial would stay RUNNING with no one to fail it."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._deferred = []
        self._saved_handlers = {s: signal.signal(s, lambda signum, frame: self._deferred.append(signum))
                                for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_interrupts(self, *, deliver: bool = True) -> list[int]:
        saved, self._saved_handlers = self._saved_handlers, None
        if saved is None:
            return []
        for s, handler in saved.items():
            signal.signal(s, handler)
        held, self._deferred = self._deferred, []
        if held and deliver:
            signal.raise_signal(held[0])  # delivered now, to the usual handler
        return held

    def abandon(self) -> None:
        """On an interrupt: this worker's trial is re-queued with its parameters for when the
        study continues, then failed (when the interrupt hit the objective, ``wrap`` queued the
        copy and Optuna failed it; this covers the moments around it)."""
        self.release(deliver=False)  # this is the interrupt's own handling: none held back to deliver
        if self.current is None:
            return
        running = copied = False
        with contextlib.suppress(Exception):
            running = self.storage.get_trial(self.current).state == TrialState.RUNNING
            if running:
                self.storage.set_trial_user_attr(self.current, "fail_reason", INTERRUPTED)
            # first: see there. ``interrupted``: the interrupt hit the objective, and the storage may
            # have failed ``wrap``'s mark and copy but come back for Optuna's FAIL (no fail_reason then).
            requeue_interrupted(self.study, self.storage.get_trial(self.current), self.max_retry, interrupted=self.interrupted)
            copied = True
        # Not copied (the storage failing): with heartbeats, left RUNNING for another worker to
        # fail and re-queue; without, nobody would, and it would hold a budget slot for good.
        if running and (copied or not self.heartbeats):
            with contextlib.suppress(Exception):
                self.storage.set_trial_state_values(self.current, TrialState.FAIL)

    def _expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class Heartbeats:
    """Heartbeats for trials that run outside ``study.optimize`` (a fused batch: Optuna writes
    none for ask/tell trials), from one background thread, each from ``add`` until ``discard``.
    Started before the batch is claimed: claiming K trials samples K points (seconds each with
    the GP), and the first one's heartbeat must not wait for the last."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self.storage, self.interval = storage, storage.get_heartbeat_interval()
        self.trial_ids: set[int] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeats":
        if self.interval is not None:
            self._thread = threading.Thread(target=self._beat, name="fairfront-heartbeats", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def add(self, trial_id: int) -> None:
        with self._guard:
            self.trial_ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._guard:
            self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._guard:
                trial_ids = sorted(self.trial_ids)
            for trial_id in trial_ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # noqa: BLE001 - a missed beat is retried next interval
                    log.warning("heartbeat of trial id %d failed: %s", trial_id, error_reason(err))


__all__ = ["FINISHED", "Heartbeats", "SESSIONS_ATTR", "TrialBudget"]
