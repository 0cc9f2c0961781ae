"""The study lock: a mutex shared by every worker of one study (a PostgreSQL advisory lock, MySQL
``GET_LOCK``, or a file lock beside a SQLite database), held while a worker decides whether to
start a trial and creates it. The server or the kernel releases it when its holder dies. See
search/workers.py for why the budget needs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
from pathlib import Path
from typing import Literal

import sqlalchemy
from optuna.storages import RDBStorage
from sqlalchemy.engine import make_url

from search.storage import call_with_retry, error_reason, sqlite_file

log = logging.getLogger(__name__)


class StudyLock:
    """A mutex shared by every worker of one study; released by the server or kernel when its
    holder dies. ``acquire`` blocks; transient errors are retried like every storage call."""

    def __init__(self, retry_seconds: float) -> None:
        self.retry_seconds = retry_seconds
        self.held = False

    def acquire(self) -> None:
        call_with_retry(self._acquire, retry_seconds=self.retry_seconds, what="study lock")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._release()

    def __enter__(self) -> "StudyLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _acquire(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


class _SQLLock(StudyLock):
    """A session-level lock on a dedicated autocommit connection (PostgreSQL advisory lock, MySQL
    GET_LOCK): the server drops it with the connection when the worker dies."""

    def __init__(self, engine: sqlalchemy.Engine, digest: bytes, retry_seconds: float) -> None:
        super().__init__(retry_seconds)
        self.engine, self.connection = engine, None
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self.name = "fairfront-" + digest.hex()[:40]
        self.postgres = engine.dialect.name == "postgresql"

    def _acquire(self) -> None:
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            if self.postgres:
                # A partitioned holder is noticed by keepalives (seconds), not the kernel default (hours).
                connection.exec_driver_sql("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3")
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
            else:
                connection.execute(sqlalchemy.text("SELECT GET_LOCK(:name, -1)"), {"name": self.name})
        except BaseException:
            connection.invalidate()
            connection.close()
            raise
        self.connection = connection

    def _release(self) -> None:
        connection, self.connection = self.connection, None
        try:
            if self.postgres:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            else:
                connection.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:name)"), {"name": self.name})
            connection.close()
        except Exception as err:  # the lock goes with the connection anyway
            log.warning("storage: releasing the study lock failed (%s); dropping its connection", error_reason(err))
            with contextlib.suppress(Exception):
                connection.invalidate()
                connection.close()


class _FileLock(StudyLock):
    """``flock`` on a file beside the SQLite database (SQLite serves one node anyway)."""

    def __init__(self, path: Path, retry_seconds: float) -> None:
        super().__init__(retry_seconds)
        self.path, self.handle = path, None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
        self.handle = handle

    def _release(self) -> None:
        handle, self.handle = self.handle, None
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


class _NoLock(StudyLock):
    """No lock: a backend with neither a server-side lock nor a database file (in-memory SQLite,
    which one process holds), when the caller gives no folder for a lock file."""

    def _acquire(self) -> None:
        pass

    def _release(self) -> None:
        pass


Purpose = Literal["trials", "requeue"]


def study_lock(storage: RDBStorage, study_name: str, *, fallback_dir: Path | None,
               purpose: Purpose = "trials") -> StudyLock:
    """The study-wide lock for ``storage``'s backend (see the module docstring); a lock file in
    ``fallback_dir`` for other backends, or none when it is None. Each ``purpose`` is a lock of
    its own: "trials" guards starting trials, "requeue" the check-then-insert of a retry copy."""
    retry = getattr(storage, "retry_seconds", 120.0)
    # The purpose leads, so no study name can reach another purpose's key ("X" re-queueing must
    # not wait on a study named "X/requeue"), and the hash keeps names that differ only in
    # characters a file name cannot hold ("a b", "a_b") apart.
    digest = hashlib.sha256(f"fairfront/{purpose}/{study_name}".encode()).digest()
    url = make_url(storage.url)
    backend = url.get_backend_name()
    if backend in ("postgresql", "mysql", "mariadb"):
        return _SQLLock(storage.engine, digest, retry)
    stem = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', study_name)}-{digest.hex()[:8]}.{purpose}.lock"
    if database := sqlite_file(storage.url):
        return _FileLock(Path(f"{database}.{stem}"), retry)
    if fallback_dir is None:
        return _NoLock(retry)
    log.warning("storage: no server-side lock for %r; workers on other nodes may overshoot the trial budget", backend)
    return _FileLock(fallback_dir / f".{stem}", retry)


__all__ = ["StudyLock", "study_lock"]
