"""Many workers, one study: Optuna's own distributed mode, no scheduler of ours.

A worker is one ``run_study.py optimize`` process; any number of them, on any nodes, share a
study through its storage URL. ``--workers K`` starts K of them on this node (:func:`run_workers`),
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
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from search.config import StudyConfig
from search.samplers import build_sampler
from search.space import suggest
from search.storage import error_reason, fail_dead_trials, install_log_redaction, storage_of, study_lock

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SESSIONS_ATTR = "worker_sessions"  # study user attribute: how many workers have joined the study


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
        self.space, self.defaults = config.search_space, dataclasses.asdict(config.training)
        self.current: int | None = None  # trial id of the running trial of this worker
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
            try:
                dead = fail_dead_trials(self.study, self.storage)
                if dead:
                    log.warning("failed the trial(s) %s of dead worker(s)", ", ".join(map(str, dead)))
                trials = self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                finished = sum(t.state in FINISHED for t in trials)
                running = tuple(t.number for t in trials if t.state == TrialState.RUNNING)
                if finished >= self.target:
                    self.lock.release()
                    return 0
                if self._expired():
                    self.lock.release()
                    log.info("timeout: not starting another trial")
                    return 0
                free = self.target - finished - len(running)
                if free > 0:
                    self._waiting_for = None
                    self._defer_interrupts()
                    return min(wanted, free)  # lock held: released once the trials exist (claim, then release)
            except BaseException:
                self.lock.release()
                raise
            self.lock.release()
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
                with contextlib.suppress(Exception):
                    trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
                raise

        return claimed

    def release(self, *, deliver: bool = True) -> list[int]:
        """Let go of the lock and restore the signal handlers. A Ctrl-C / SIGTERM held back since
        ``next_slots`` is delivered now, or with ``deliver=False`` returned (the caller first
        fails its trials, then delivers it)."""
        self.lock.release()
        return self._restore_interrupts(deliver=deliver)

    def _defer_interrupts(self) -> None:
        """Hold Ctrl-C / SIGTERM from the decision to start a trial until the trial exists with its
        first heartbeat (``study.ask`` can take seconds): interrupted in between, the new trial
        would stay RUNNING with no one to fail it."""
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
        """On an interrupt: this worker's trial must not stay RUNNING (Optuna fails it when the
        interrupt hits the objective; this covers the moments around it)."""
        self.lock.release()
        for s, handler in (self._saved_handlers or {}).items():
            signal.signal(s, handler)
        self._saved_handlers = None
        if self.current is None:
            return
        with contextlib.suppress(Exception):
            if self.storage.get_trial(self.current).state == TrialState.RUNNING:
                self.storage.set_trial_user_attr(self.current, "fail_reason", "interrupted (Ctrl-C or SIGTERM)")
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


# --- devices -----------------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def parse_devices(spec: str | None, default_device: str) -> list[str]:
    """``--devices``: "0,1" -> cuda:0, cuda:1; "cpu"; "cuda:2"; "all" or None: every visible GPU
    (or the study's ``training.device`` when it names one device or the CPU); the CPU when none."""
    if spec is None or spec.strip() == "all":
        if spec is None and default_device not in ("auto", "cuda"):
            return [default_device]
        return visible_gpus() or ["cpu"]
    devices = []
    gpus = visible_gpus()
    for item in (s.strip() for s in spec.split(",")):
        if item == "cpu":
            devices.append("cpu")
            continue
        name = f"cuda:{item}" if item.isdigit() else item
        if not name.startswith("cuda:") or not name[5:].isdigit():
            raise ValueError(f"--devices: {item!r} is not a GPU index, cuda:N or cpu")
        if name not in gpus:
            raise ValueError(f"--devices: {name} is not visible here (visible: {', '.join(gpus) or 'no GPU'})")
        devices.append(name)
    if not devices:
        raise ValueError("--devices: give at least one device")
    return devices


def assign_devices(workers: int, devices: list[str]) -> list[str]:
    """Round-robin: worker i gets devices[i % len(devices)]."""
    return [devices[i % len(devices)] for i in range(workers)]


def cpu_threads(assignment: list[str]) -> int:
    """Intra-op threads per CPU worker: the cores this process may use, shared evenly."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, assignment.count("cpu")))


def worker_config(config: StudyConfig, device: str) -> StudyConfig:
    """The study config as one worker runs it: pinned to ``device``; the parent did the warm start."""
    return dataclasses.replace(config, training=dataclasses.replace(config.training, device=device), warm_start=False)


# --- signals -----------------------------------------------------------------------------------


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM (docker stop, scancel) behaves like Ctrl-C. A second signal while stopping is
    ignored so the first one's clean-up (failing the running trials) can finish; a third ends the
    process at once (a clean-up stuck on an unreachable database must not need SIGKILL)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum: int, frame: object) -> None:
        stopping.append(signum)
        if len(stopping) == 1:
            raise KeyboardInterrupt
        if len(stopping) == 2:
            log.warning("already stopping: signal %d ignored while the running trials are failed; "
                        "send it once more to exit at once", signum)
            return
        log.error("signal %d a third time: exiting now; running trials are left to the next worker's heartbeat check", signum)
        os._exit(130)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- local worker processes ----------------------------------------------------------------------


@dataclass
class WorkerRun:
    study: optuna.Study
    exit_codes: list[int | None]
    interrupted: bool
    finished: int
    target: int

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.finished >= self.target else 1


def run_workers(config: StudyConfig, *, workers: int, devices: str | None = None, n_trials: int | None = None,
                timeout: float | None = None, progress: bool = True, verbose: bool = False,
                stop_grace: float = 60.0, fuse: int | None = None, study_args: str | None = None) -> WorkerRun:
    """Start ``workers`` processes on this node, each pinned to a device, sharing the study; wait
    for them. ``prepare`` runs once before they start (they then load its caches). A worker that
    crashes does not stop the others; Ctrl-C / SIGTERM stops them all cleanly. ``fuse=K``: each
    worker trains K trials at a time (search/fused_batch.py). ``study_args``: as for ``optimize``."""
    from search.study import finished_count, open_study, warm_start
    from search.study_args import remember_study_args

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    chosen = parse_devices(devices, config.training.device)
    if len(chosen) > workers:
        log.warning("%d worker(s) for %d devices: %s stay idle (give --workers %d)", workers, len(chosen),
                    ", ".join(chosen[workers:]), len(chosen))
    assignment = assign_devices(workers, chosen)
    threads = cpu_threads(assignment)
    target = n_trials or config.budget.n_trials
    study = open_study(config)  # first: an unreachable storage fails before minutes of preparation
    if study_args:
        remember_study_args(study, study_args)
    _prepare_once(worker_config(config, assignment[0]), progress=progress)
    warm_start(study, config)
    if finished_count(study) >= target:
        log.info("study %s already has %d finished trials (budget %d)", config.name, finished_count(study), target)
        return WorkerRun(study, [], False, finished_count(study), target)

    log.info("starting %d workers on %s%s%s", workers, ", ".join(assignment),
             f" ({threads} CPU thread(s) each)" if "cpu" in assignment else "", f", {fuse} fused trials each" if fuse else "")
    context = _worker_context(gpu=any(d != "cpu" for d in assignment))
    procs = [
        context.Process(target=_worker_main, name=f"fairfront-worker-{i}",
                        args=(i, worker_config(config, device), target, timeout, threads, verbose, fuse))
        for i, device in enumerate(assignment)
    ]
    interrupted = False
    with interrupts_as_keyboard():
        try:
            for p in procs:  # (a forkserver's first start takes seconds: an interrupt may come here)
                p.start()
            _wait(procs, assignment)
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: stopping the workers (their running trials end FAIL)")
            _stop(procs, stop_grace)
    done = finished_count(study)
    codes = [p.exitcode for p in procs]
    if not interrupted and done < target:
        log.error("study %s has %d of %d finished trials; worker exit codes %s", config.name, done, target, codes)
    return WorkerRun(study, codes, interrupted, done, target)


def _worker_context(*, gpu: bool) -> multiprocessing.context.BaseContext:
    """How worker processes start. GPU workers: spawned (a fresh interpreter each; CUDA must not
    be initialised before a fork, and start-up is nothing next to a GPU trial). CPU workers:
    forked from a fresh server process that imported torch, open_clip and optuna once, so K
    workers start in the time of one import instead of K imports fighting for the same cores."""
    if gpu or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["search.study"])
    return context


def _prepare_once(config: StudyConfig, *, progress: bool) -> None:
    """Build the shared caches and Stage 1 once, before any worker starts. On a GPU this runs in
    a short-lived process so the parent never holds a CUDA context."""
    if config.training.device.startswith("cuda"):
        run_in_child(_prepare, config, progress, name="fairfront-prepare")
    else:
        _prepare(config, progress)


def _prepare(config: StudyConfig, progress: bool) -> None:
    from model import prepare

    prepare(config.base_run_config(), progress=progress, with_test_caches=False)


_MAX_MESSAGE = 8000  # characters of a child's error message sent back (a pipe's buffer holds more)
_USER_ERRORS = (FileNotFoundError, ValueError)  # run_study.py's one-line errors: they cross with their type


def run_in_child(func: Callable[..., object], *args: object, name: str, stop_grace: float = 60.0) -> None:
    """``func(*args)`` in a fresh spawned process, waited for. A ``ValueError`` or
    ``FileNotFoundError`` there (bad input) is raised here with its message; any other failure is
    a RuntimeError (the child printed its traceback). Ctrl-C or SIGTERM here stops the child too
    (SIGTERM, which it takes as Ctrl-C and cleans up after, then SIGKILL after ``stop_grace``)
    instead of waiting minutes for a cache build to finish: a SIGTERM reaches only this process.
    The child ignores SIGINT: a terminal's Ctrl-C reaches it too, and only the parent's SIGTERM
    may count as its first signal, or the user's second Ctrl-C would be its third (exit at once,
    no clean-up)."""
    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    child = context.Process(target=_child_main, args=(func, args, errors), name=name)
    try:
        child.start()
        child.join()
    except KeyboardInterrupt:
        log.warning("interrupted: stopping %s", name)
        _stop([child], stop_grace)
        raise
    if child.exitcode == 0:
        return
    if not errors.empty():
        kind, message = errors.get()
        raise next(e for e in _USER_ERRORS if e.__name__ == kind)(message)
    if child.exitcode == 130:  # stopped by a SIGTERM sent to it alone (its own Ctrl-C is ignored)
        raise KeyboardInterrupt
    if child.exitcode < 0:
        raise RuntimeError(f"{name} was killed by signal {-child.exitcode} (out of memory?)")
    raise RuntimeError(f"{name} failed in its own process (exit code {child.exitcode}); its traceback is above")


def _child_main(func: Callable[..., object], args: tuple, errors) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    install_log_redaction()
    with interrupts_as_keyboard():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # see run_in_child; the context restores it
        try:
            func(*args)
        except _USER_ERRORS as err:  # only type and message cross: a subclass may not unpickle there
            kind = next(e for e in _USER_ERRORS if isinstance(err, e))
            errors.put((kind.__name__, str(err)[:_MAX_MESSAGE]))
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)


def _wait(procs: list, assignment: list[str]) -> None:
    reported = set()
    while any(p.is_alive() for p in procs):
        for i, p in enumerate(procs):
            p.join(timeout=0.5)
            if p.exitcode not in (None, 0) and i not in reported:
                reported.add(i)
                how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
                log.error("worker %d (%s) died (%s); the others go on, its running trial is retried after the "
                          "heartbeat grace period", i, assignment[i], how)


def _stop(procs: list, grace: float) -> None:
    procs = [p for p in procs if p.pid is not None]  # interrupted while starting them: the started ones
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            log.error("worker %s did not stop within %.0f s; killed (its trial fails after the grace period)", p.name, grace)
            p.kill()
            p.join()


def _no_interrupt_traceback(record: logging.LogRecord) -> bool:
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        record.exc_info, record.exc_text = None, None
    return True


def drop_interrupt_tracebacks() -> None:
    """Ctrl-C is not a crash: Optuna's "trial failed" line stays, its KeyboardInterrupt traceback
    goes (every handler of the root logger and of Optuna's own)."""
    for logger in (logging.getLogger(), logging.getLogger("optuna")):
        for handler in logger.handlers:
            handler.addFilter(_no_interrupt_traceback)


def _worker_main(index: int, config: StudyConfig, target: int, timeout: float | None, threads: int, verbose: bool,
                 fuse: int | None = None) -> None:
    """One worker process: pinned to its device, logs prefixed with its index, exits 0, 1 or 130."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, datefmt="%H:%M:%S",
                        format=f"%(asctime)s w{index} %(levelname)s %(name)s: %(message)s", force=True)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()  # Optuna's messages through the same (redacting) handler
    install_log_redaction()
    drop_interrupt_tracebacks()
    import torch

    from search.fused_batch import optimize_fused
    from search.study import optimize

    device = config.training.device
    if device == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.cuda.set_device(torch.device(device))
    code = 0
    with interrupts_as_keyboard():
        try:
            if fuse:
                optimize_fused(config, group_size=fuse, n_trials=target, timeout=timeout, progress=False)
            else:
                optimize(config, n_trials=target, timeout=timeout, progress=False)
        except KeyboardInterrupt:
            log.warning("worker %d interrupted", index)
            code = 130
        except ValueError as err:  # a clear, one-line problem (storage unreachable, bad data)
            log.error("worker %d: %s", index, err)
            code = 1
        except Exception:
            log.exception("worker %d failed", index)
            code = 1
    logging.shutdown()
    sys.exit(code)


__all__ = ["Heartbeats", "TrialBudget", "WorkerRun", "assign_devices", "cpu_threads", "drop_interrupt_tracebacks", "interrupts_as_keyboard", "parse_devices", "run_in_child", "run_workers", "worker_config"]
