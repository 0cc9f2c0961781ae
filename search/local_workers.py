"""``--workers K``: K worker processes on this node, each pinned to a device, sharing one study.

``prepare`` runs once before they start (in a short-lived child on a GPU, so the parent never
holds a CUDA context); each worker is then ``search.optimize`` (or, with ``--fuse``,
``search.fused_batch.optimize_fused``) in its own process, coordinated with every other worker of
the study by search/workers.py. A worker that dies does not stop the others; Ctrl-C or SIGTERM
stops them all, and their running trials end FAIL.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass

import optuna

from search.config import StudyConfig
from search.processes import drop_interrupt_tracebacks, interrupts_as_keyboard, run_in_child, stop_processes
from search.credentials import install_log_redaction

log = logging.getLogger(__name__)


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


# --- worker processes --------------------------------------------------------------------------


@dataclass
class WorkerRun:
    study: optuna.Study
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
        return WorkerRun(study, False, finished_count(study), target)

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
            stop_processes(procs, stop_grace)
    done = finished_count(study)
    codes = [p.exitcode for p in procs]
    if not interrupted and done < target:
        log.error("study %s has %d of %d finished trials; worker exit codes %s", config.name, done, target, codes)
    return WorkerRun(study, interrupted, done, target)


def _worker_context(*, gpu: bool) -> multiprocessing.context.BaseContext:
    """How worker processes start. GPU workers: spawned (a fresh interpreter each; CUDA must not
    be initialised before a fork, and start-up is nothing next to a GPU trial). CPU workers:
    forked from a fresh server process that imported torch, open_clip and optuna once, so K
    workers start in the time of one import instead of K imports fighting for the same cores."""
    if gpu or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # (open_clip by name: model.backbone imports it only when a backbone is needed, and every
    # worker's prepare reads the backbone's shape from it)
    context.set_forkserver_preload(["search.local_workers", "search.study", "open_clip"])
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


__all__ = ["WorkerRun", "assign_devices", "cpu_threads", "parse_devices", "run_workers", "worker_config"]
