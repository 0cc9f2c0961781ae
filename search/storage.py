"""The study storage: any SQLAlchemy URL (SQLite file by default, PostgreSQL for many workers and
nodes) as an Optuna ``RDBStorage`` with heartbeats, retry of a dead worker's trial, back-off on
transient database errors, and credentials kept out of every message.

* Credentials come from the environment (``--storage '${FAIRFRONT_STORAGE}'``); every URL this
  module opens is registered with search/credentials.py, which keeps its password out of every
  log record and error message.
* Opening the storage fails once, clearly (:class:`StorageError`); during a study, connection
  losses, deadlocks and "database is locked" are retried with exponential back-off for
  ``distributed.retry_seconds``.
* Heartbeats (``distributed.heartbeat_interval``) let any worker fail the RUNNING trial of a worker
  that died (SIGKILL, node loss) once its last heartbeat is older than ``grace_period``; the trial
  is re-queued with the same parameters up to ``max_retry`` times (``RequeueTrial``: the retry
  attributes of Optuna 5's ``RetryHeartbeatStaleTrialCallback``, none of the failed attempt's).
  A trial whose worker was interrupted (Ctrl-C, SIGTERM) is re-queued the same way by that
  worker, which then fails it (``requeue_interrupted``: the copy waits before the slot is free).
* The study-wide lock the workers share is in search/study_lock.py.
"""

from __future__ import annotations

import copy
import datetime
import logging
import re
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning, StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from search.config import DistributedConfig
from search.credentials import mask_url, redact, register_secret

log = logging.getLogger(__name__)

class StorageError(ValueError):
    """The storage cannot be opened (bad URL, unreachable server, wrong credentials, missing
    driver). A ValueError so that the command line prints it as one line; never holds a password."""


# --- transient errors and back-off ----------------------------------------------------------

_TRANSIENT_SQLITE = ("database is locked", "database table is locked", "disk i/o error", "unable to open database")


def is_transient(err: BaseException) -> bool:
    """Connection losses, timeouts, deadlocks and a busy SQLite file: worth another try."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated:
            return True
        if isinstance(err, (sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(err, sqlalchemy.exc.OperationalError):
            dialect_error = err.orig
            if type(dialect_error).__module__.startswith("sqlite3"):
                return any(m in str(dialect_error).lower() for m in _TRANSIENT_SQLITE)
            return True  # psycopg/MySQL OperationalError: connection, deadlock, serialization, timeouts
        err = getattr(err, "orig", None) if isinstance(err, sqlalchemy.exc.DBAPIError) else (err.__cause__ or err.__context__)
    return False


def error_reason(err: BaseException) -> str:
    """One redacted line naming the root cause of a storage error."""
    root = err
    while True:
        nxt = getattr(root, "orig", None) if isinstance(root, sqlalchemy.exc.DBAPIError) else root.__cause__
        if nxt is None or nxt is root:
            break
        root = nxt
    text = " ".join(str(root).split()) or type(root).__name__
    text = re.sub(r"\(Background on this error at: \S+\)", "", text).strip()
    return redact(f"{type(root).__name__}: {text}")[:400]


# SQLite: the file, its folder or the filesystem is read-only. PostgreSQL: a read-only
# transaction (a hot standby, default_transaction_read_only) or a role without INSERT/UPDATE
# (42501, insufficient privilege, which a role without SELECT also gets for its reads).
_READ_ONLY_SQLITE = ("readonly database", "read-only file system")
_READ_ONLY_SQLSTATES = ("25006", "42501")
_NO_PRIVILEGE = "42501"


def _database_errors(err: BaseException):
    """(error, SQLSTATE, the statement it failed on) along ``err``'s chain of causes."""
    seen: set[int] = set()
    statement = ""
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        statement = getattr(err, "statement", None) or statement
        yield err, getattr(err, "sqlstate", None) or getattr(err, "pgcode", None), statement
        err = getattr(err, "orig", None) if isinstance(err, sqlalchemy.exc.DBAPIError) else (err.__cause__ or err.__context__)


def _is_read(statement: str) -> bool:
    return statement.lstrip().upper().startswith("SELECT")


def refuses_writes(err: BaseException) -> bool:
    """The database refused a write because it is read-only to us: no retry will help."""
    for cause, sqlstate, statement in _database_errors(err):
        if type(cause).__module__.startswith("sqlite3") and any(m in str(cause).lower() for m in _READ_ONLY_SQLITE):
            return True
        if sqlstate in _READ_ONLY_SQLSTATES and not (sqlstate == _NO_PRIVILEGE and _is_read(statement)):
            return True
    return False


def refuses_reads(err: BaseException) -> bool:
    """The database refused a read: this role may not SELECT from the study's tables."""
    return any(sqlstate == _NO_PRIVILEGE and _is_read(statement) for _, sqlstate, statement in _database_errors(err))


_retrying = threading.local()


def call_with_retry(func: Callable[..., Any], *args: Any, retry_seconds: float, what: str, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)``; transient database errors are retried with exponential back-off
    (0.5 s doubling to 30 s) for ``retry_seconds`` in total. Nested calls retry once, at the top."""
    if getattr(_retrying, "active", False):
        return func(*args, **kwargs)
    deadline, delay = time.monotonic() + retry_seconds, 0.5
    _retrying.active = True
    try:
        while True:
            try:
                return func(*args, **kwargs)
            except Exception as err:
                if not is_transient(err) or time.monotonic() + delay > deadline:
                    raise
                log.warning("storage: %s failed (%s); retrying in %.1f s", what, error_reason(err), delay)
                time.sleep(delay)
                delay = min(2 * delay, 30.0)
    finally:
        _retrying.active = False


# Leaf RDBStorage methods (those that open their own session); wrappers above them call these.
_RETRIED = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "_create_new_trial", "_set_trial_param", "get_trial_param", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial",
    "_get_trials", "_get_best_trial_id", "record_heartbeat", "_get_stale_trial_ids",
)


class ResilientRDBStorage(RDBStorage):
    """``RDBStorage`` whose database calls survive transient errors (see :func:`call_with_retry`)
    and whose writes to a read-only database fail in one line naming the storage."""

    retry_seconds: float = DistributedConfig.retry_seconds  # make_storage sets the study's

    def _call(self, func: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
        try:
            return call_with_retry(func, *args, retry_seconds=self.retry_seconds, what=what, **kwargs)
        except StorageError:
            raise
        except Exception as err:
            # Optuna would chain three tracebacks ending in "invalid data in the commit, e.g.
            # exceeding max length", which sends the user looking in the wrong place.
            if refuses_writes(err):
                raise StorageError(
                    f"the study storage {mask_url(self.url)} refuses writes ({error_reason(err)}); optimize and evaluate "
                    "record in it and need write access (show, export and report only read it)"
                ) from err
            if refuses_reads(err):
                raise StorageError(
                    f"the study storage {mask_url(self.url)} refuses this role's reads ({error_reason(err)}); every command "
                    "needs SELECT on the study's tables, and optimize and evaluate also INSERT, UPDATE and DELETE"
                ) from err
            raise

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        attempts = []

        def attempt() -> bool:
            attempts.append(1)
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                # A retried commit that had in fact gone through: the trial is in the state we asked.
                if len(attempts) > 1 and RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        return self._call(attempt, what="set_trial_state_values")

    def check_writable(self, study_id: int) -> None:
        """Raise :class:`StorageError` now if the database refuses writes. The probe rewrites the
        study's row to its own value and rolls back: SQLite takes its write lock for it (and says
        "readonly database"), PostgreSQL checks the transaction mode and the role's UPDATE right."""

        def probe() -> None:
            with self.engine.connect() as connection, connection.begin() as transaction:
                connection.execute(sqlalchemy.text("UPDATE studies SET study_name = study_name WHERE study_id = :id"),
                                   {"id": study_id})
                transaction.rollback()

        self._call(probe, what="check_writable")


def _retrying_method(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    def wrapper(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(method, self, *args, what=name, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = method.__doc__
    return wrapper


for _name in _RETRIED:
    setattr(ResilientRDBStorage, _name, _retrying_method(_name))


# --- opening the storage ----------------------------------------------------------------------


class RequeueTrial:
    """Re-queue a failed trial with the same parameters (WAITING: workers take it before they
    sample a new one) up to ``max_retry`` times, once per trial (a second call, from the other
    path, finds the copy: the check and the insert hold a study-wide lock of their own). The
    copy's ``system_attrs`` name the original trial and the chain of attempts as Optuna's
    ``RetryHeartbeatStaleTrialCallback`` writes them (``failed_trial``, ``retry_history``).
    ``cause`` (why it failed) goes in the log line.

    Unlike Optuna's callback it copies nothing the failed attempt recorded: its curve, metrics,
    artifacts, stop reason or sampler state (NSGA-II's generation) would otherwise stay on the
    new run, and be shown for it when that run fails before it records its own."""

    KEPT_USER_ATTRS = ("reference_config",)  # set when the trial was queued, not by its run

    def __init__(self, max_retry: int, cause: str = "its worker died") -> None:
        self.max_retry, self.cause = max_retry, cause

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from search.study_lock import study_lock  # it imports this module

        storage = storage_of(study)
        # The check and the insert under one lock of their own, held for milliseconds: a worker
        # failing the trial as dead (under the study lock) and its interrupted worker (which must
        # not wait for the study lock: a GP claim holds it for seconds, docker stop kills after
        # 10) would otherwise both find no copy when its heartbeat went stale before the interrupt.
        # None: in-memory SQLite, one process, no lock.
        lock = study_lock(storage, study.study_name, fallback_dir=None, purpose="requeue")
        # Retried here, as a whole, not inside add_trial: a commit whose reply was lost (connection
        # dropped) is then found by the check below instead of being written a second time.
        call_with_retry(self._queue_once_under, lock, study, trial, retry_seconds=getattr(storage, "retry_seconds", 0.0),
                        what="re-queue")

    def _queue_once_under(self, lock, study: optuna.Study, trial: FrozenTrial) -> None:
        with lock:
            self._queue_once(study, trial)

    def _queue_once(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if any(trial.number in t.system_attrs.get("retry_history", ()) for t in study.get_trials(deepcopy=False)):
            return  # copied already: its worker queued the copy when interrupted, then lost its heartbeat
        # A queued trial (a warm-start reference) keeps the parameters it was queued with: sampled
        # only in part or not at all when its worker died, its copy still gets all of them. Any
        # other trial without parameters is not copied: that would be a new point, not a retry.
        queued_with = trial.system_attrs.get("fixed_params") or {}
        if not trial.params and not queued_with:
            log.warning("trial %d: %s before its parameters were sampled; not re-queued", trial.number, self.cause)
            return
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) > self.max_retry:
            log.warning("trial %d: %s; not retried (distributed.max_retry=%d reached)", trial.number, self.cause, self.max_retry)
            return
        retry = {"failed_trial": trial.system_attrs.get("failed_trial", trial.number), "retry_history": history}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs={k: trial.user_attrs[k] for k in self.KEPT_USER_ATTRS if k in trial.user_attrs},
            system_attrs={**retry, "fixed_params": queued_with} if queued_with else retry,
        ))
        log.warning("trial %d: %s; re-queued with the same parameters", trial.number, self.cause)


def requeue_interrupted(study: optuna.Study, trial: FrozenTrial, max_retry: int, *, interrupted: bool = False) -> None:
    """Queue a copy of ``trial`` with its parameters if its worker was interrupted (Ctrl-C,
    SIGTERM: a preempted or cancelled job; ``fail_reason`` says so, or the caller, which saw the
    interrupt, passes ``interrupted=True``) and no copy is queued yet. The interruption says
    nothing about its parameters: the study, when continued, runs them again.

    Call it while the trial is still RUNNING, then fail it: the copy is then WAITING when the slot
    is given back, and the next worker's ``study.ask`` takes it. Failed first, the slot would be
    free for a moment with nothing queued, and a worker polling then would fill it with a new point
    (the last slot: the copy stays queued past the budget). A trial already FAIL is copied too
    (an interrupt that landed where the caller could not queue first)."""
    reason = str(trial.user_attrs.get("fail_reason", ""))
    if trial.state not in (TrialState.RUNNING, TrialState.FAIL) or not (interrupted or reason.startswith("interrupted")):
        return
    RequeueTrial(max_retry, cause="interrupted")(study, trial)


def _engine_kwargs(url: str, options: DistributedConfig) -> dict[str, Any]:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": max(30.0, options.connect_timeout)}}
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend in ("postgresql", "mysql", "mariadb"):
        kwargs["connect_args"] = {"connect_timeout": max(1, int(options.connect_timeout))}
    return kwargs


def sqlite_file(url: str) -> Path | None:
    """The database file of a file-backed SQLite URL; None for other URLs (and in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    database = parsed.database
    if str(parsed.query.get("uri", "")).lower() in ("true", "1") and database.startswith("file:"):
        # SQLite's URI form (sqlite:///file:/path/study.db?mode=ro&uri=true), e.g. a read-only copy
        if parsed.query.get("mode") == "memory":
            return None
        database = urllib.parse.urlsplit(database).path
        if not database or database == ":memory:":
            return None
    return Path(database)


# Errors of two processes creating the schema of a new database at once (workers starting together):
# the loser finds the tables made, and its second try reads them.
_SCHEMA_RACE = ("already exists", "unique constraint failed: alembic_version", "duplicate key value", "duplicate entry")


def _create_storage(url: str, engine_kwargs: dict[str, Any], heartbeat: dict[str, Any]) -> ResilientRDBStorage:
    for attempt in range(1, 5):
        try:
            return ResilientRDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as err:
            if not any(m in error_reason(err).lower() for m in _SCHEMA_RACE):
                raise
            log.info("storage: another process was creating the schema (%s); reading it again", error_reason(err))
            time.sleep(0.2 * attempt)
    return ResilientRDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)  # the fifth try raises what it meets


def make_storage(url: str, options: DistributedConfig | None = None) -> ResilientRDBStorage:
    """Open ``url`` as a :class:`ResilientRDBStorage` with heartbeats and dead-worker retry.

    Raises :class:`StorageError` (one line, password masked) when the URL is malformed, the driver
    is missing or the database cannot be reached; nothing of the original exception is chained.
    """
    options = options or DistributedConfig()
    register_secret(url)
    shown = mask_url(url)
    try:
        make_url(url)
    except Exception:
        raise StorageError(f"storage: not a valid SQLAlchemy URL: {shown}") from None
    if database := sqlite_file(url):
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"storage: cannot create the folder of the SQLite file {database} ({err.strerror})") from None
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
            warnings.simplefilter("ignore", ExperimentalWarning)
            heartbeat = {}
            if options.heartbeat_interval is not None:
                heartbeat = dict(
                    heartbeat_interval=options.heartbeat_interval,
                    grace_period=options.grace_seconds,
                    heartbeat_stale_trial_callback=RequeueTrial(max_retry=options.max_retry),
                )
            storage = _create_storage(url, _engine_kwargs(url, options), heartbeat)
    except ImportError as err:
        hint = " (PostgreSQL: pip install -e '.[postgres]')" if url.startswith("postgresql") else ""
        raise StorageError(f"storage {shown}: database driver missing: {redact(err)}{hint}") from None
    except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError, OSError, ValueError, RuntimeError) as err:
        # RuntimeError: a schema written by another Optuna version (the message says how to upgrade)
        raise StorageError(f"cannot open the study storage {shown}: {error_reason(err)}") from None
    storage.retry_seconds = options.retry_seconds
    return storage


def storage_of(study: optuna.Study) -> RDBStorage | None:
    """The RDBStorage behind ``study`` (Optuna wraps it in a cache), or None for other storages."""
    backend = getattr(study._storage, "_backend", study._storage)
    return backend if isinstance(backend, RDBStorage) else None


def require_write_access(study: optuna.Study) -> None:
    """Stop now, in one line, if ``study``'s database refuses writes. ``optimize`` and ``evaluate``
    would otherwise find out at their first write, which can come after minutes of preparation
    and scoring: a study whose remembered arguments are unchanged writes nothing before then."""
    storage = storage_of(study)
    if isinstance(storage, ResilientRDBStorage):
        storage.check_writable(storage.get_study_id_from_name(study.study_name))


# --- dead workers ----------------------------------------------------------------------------


def fail_dead_trials(study: optuna.Study, storage: RDBStorage) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and re-queue them (the storage's callback).

    Gone: the last heartbeat is older than the grace period (Optuna's rule), or the trial never
    got a heartbeat and started longer than the grace period ago (its worker died while creating
    it: every fairfront worker records a first heartbeat before it releases the study lock).
    Returns the numbers of the failed trials.
    """
    interval = storage.get_heartbeat_interval()
    if interval is None:
        return []
    grace = storage.grace_period or 2 * interval
    study_id = study._study_id
    dead = set(storage._get_stale_trial_ids(study_id)) | set(call_with_retry(
        _trials_without_heartbeat, storage, study_id, grace, retry_seconds=getattr(storage, "retry_seconds", 0.0), what="orphans"))
    failed = []
    for trial_id in sorted(dead):
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", "worker lost: no heartbeat within the grace period")
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
        except UpdateFinishedTrialError:
            continue  # another worker got there first
    callback = storage.get_heartbeat_stale_trial_callback()
    numbers = []
    for trial_id in failed:
        trial = storage.get_trial(trial_id)
        numbers.append(trial.number)
        if callback is not None:
            callback(study, copy.deepcopy(trial))
    return numbers


def _trials_without_heartbeat(storage: RDBStorage, study_id: int, grace: float) -> list[int]:
    from optuna.storages._rdb import models  # the storage's own schema: Optuna has no query for this

    session = storage.scoped_session()
    try:
        rows = (
            session.query(models.TrialModel.trial_id)
            .outerjoin(models.TrialHeartbeatModel, models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
            .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING)
            .filter(models.TrialHeartbeatModel.trial_heartbeat_id.is_(None))
            .all()
        )
        session.commit()
    finally:
        session.close()
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    return [trial_id for (trial_id,) in rows if (storage.get_trial(trial_id).datetime_start or cutoff) < cutoff]


__all__ = [
    "RequeueTrial", "ResilientRDBStorage", "StorageError", "call_with_retry", "error_reason", "fail_dead_trials", "requeue_interrupted",
    "is_transient", "make_storage", "refuses_reads", "refuses_writes", "require_write_access", "sqlite_file", "storage_of",
]
