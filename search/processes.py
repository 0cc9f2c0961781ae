"""Signals and child processes: SIGTERM as Ctrl-C, no traceback for an interrupt, and child
processes that are stopped (and clean up) when their parent is.

A SIGTERM (``docker stop``, ``scancel``, ``kill``) reaches one process, a terminal's Ctrl-C the whole
process group; either way a fairfront process ends its running work as after Ctrl-C: running
trials end FAIL, a half-built cache is removed, and the children it waits for are stopped too.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from search.credentials import install_log_redaction

log = logging.getLogger(__name__)


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

    def swallowed(unraisable) -> None:
        # The handler raises wherever the main thread is; inside a finalizer or a GC callback
        # Python prints "Exception ignored" and goes on, and the stop would be lost with it
        # (the handler has counted the signal). Deliver it again 10 ms later, by an alarm, once
        # this hook has returned (swallowed again: delivered again).
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and stopping:
            first = stopping[0]
            stopping.clear()
            signal.signal(signal.SIGALRM, lambda signum, frame: handler(first, frame))
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            armed.append(first)
            return
        previous_hook(unraisable)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGALRM] = signal.getsignal(signal.SIGALRM)
    previous_hook, sys.unraisablehook = sys.unraisablehook, swallowed
    armed: list[int] = []
    try:
        yield
    finally:
        if armed:  # (an alarm still pending would end the process once SIGALRM is restored)
            signal.setitimer(signal.ITIMER_REAL, 0)
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)


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


_MAX_MESSAGE = 8000  # characters of a child's error message sent back (a pipe's buffer holds more)
_USER_ERRORS = (FileNotFoundError, ValueError)


def is_user_error(err: BaseException) -> bool:
    """Bad input, which run_study.py tells in one line (exit 2): a ValueError, a FileNotFoundError,
    or an OSError that names its file (an --out under a file, a folder without write permission).
    An OSError that names nothing (a full disk mid-run) is a crash and keeps its traceback."""
    return isinstance(err, _USER_ERRORS) or (isinstance(err, OSError) and err.filename is not None)


def run_in_child(func: Callable[..., object], *args: object, name: str, stop_grace: float = 60.0) -> None:
    """``func(*args)`` in a fresh spawned process, waited for. Bad input there (is_user_error) is
    raised here with its type and message, an OSError with its errno and file; any other failure
    is a RuntimeError (the child printed its traceback). Ctrl-C or SIGTERM here stops the child too
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
        stop_processes([child], stop_grace)
        raise
    if child.exitcode == 0:
        return
    if not errors.empty():
        kind, detail = errors.get()
        if kind == "OSError":
            raise OSError(*detail)  # (errno, strerror, filename): the subclass comes back from the errno
        raise next(e for e in _USER_ERRORS if e.__name__ == kind)(detail)
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
        except Exception as err:
            if not is_user_error(err):
                raise
            # only plain values cross: a subclass (ConfigError) may not unpickle there
            if isinstance(err, OSError) and err.errno is not None:
                errors.put(("OSError", (err.errno, err.strerror, err.filename)))
            else:
                kind = next(e for e in _USER_ERRORS if isinstance(err, e))
                errors.put((kind.__name__, str(err)[:_MAX_MESSAGE]))
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)


def stop_processes(procs: list, grace: float) -> None:
    """SIGTERM to each started, live process of ``procs``; SIGKILL to those still alive after ``grace`` seconds."""
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
            log.error("%s did not stop within %.0f s; killed (a trial it was running fails after the heartbeat grace period)",
                      p.name, grace)
            p.kill()
            p.join()


__all__ = ["drop_interrupt_tracebacks", "interrupts_as_keyboard", "is_user_error", "run_in_child", "stop_processes"]
