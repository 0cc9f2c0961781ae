"""The study storage on a real PostgreSQL server and on SQLite: credentials masked everywhere,
one clear error at start, transient outages retried, dead workers' trials failed and re-queued,
and a study lock that dies with its holder."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import types
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.config import DistributedConfig
from search.credentials import RedactingFilter, mask_url, redact, register_secret
from search.storage import StorageError, fail_dead_trials, make_storage, require_write_access, requeue_interrupted, storage_of
from search.study_lock import study_lock

REPO = Path(__file__).resolve().parents[2]
FAST = DistributedConfig(heartbeat_interval=1, grace_period=2, max_retry=1, connect_timeout=3, retry_seconds=20)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres_url")


def test_mask_and_redact_remove_passwords_in_any_form():
    url = "postgresql+psycopg://alice:p%40ss-W0rd!@db.example:5432/fairfront"
    register_secret(url)
    assert mask_url(url) == "postgresql+psycopg://alice:***@db.example:5432/fairfront"
    text = f"could not connect with {url}; password p@ss-W0rd! rejected ('p%40ss-W0rd!')"
    clean = redact(text)
    assert "p@ss" not in clean and "p%40ss" not in clean and "alice:***@db.example" in clean
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    # a reference to the environment is no secret; a literal password beside one is
    assert mask_url("postgresql://alice:${DB_PASSWORD}@db/f") == "postgresql://alice:${DB_PASSWORD}@db/f"
    assert mask_url("postgresql://alice:s3cret@${DB_HOST}/f") == "postgresql://alice:***@${DB_HOST}/f"

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "opening %s", (url,), None)
    try:
        raise RuntimeError(f"engine for {url} failed")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    RedactingFilter().filter(record)
    formatted = logging.Formatter().format(record)
    assert "p@ss" not in formatted and "p%40ss" not in formatted and "RuntimeError" in formatted


@pytest.mark.parametrize("what", ["wrong password", "unreachable host", "no such database", "missing driver", "malformed URL"])
def test_opening_fails_once_with_a_clear_masked_error(postgres, what, monkeypatch, caplog):
    secret = "Secr3t-" + os.urandom(4).hex()
    url = {
        "wrong password": postgres.url("postgres", password=secret),
        "unreachable host": postgres.url("postgres", password=secret, host="127.0.0.1", port=1),
        "no such database": postgres.url("nope_" + os.urandom(3).hex(), password=postgres.password),
        "missing driver": f"postgresql+nodriver://u:{secret}@127.0.0.1/db",
        "malformed URL": f"postgresql+psycopg://u:{secret}@127.0.0.1:port/db",
    }[what]
    slept = []  # no retry loop at start: one clear error, no wait before it
    clock = types.ModuleType("time")  # the real time module, but for sleep
    clock.__dict__.update(vars(time), sleep=slept.append)
    monkeypatch.setattr("search.storage.time", clock)
    with caplog.at_level(logging.INFO, logger="search.storage"), pytest.raises(StorageError) as info:
        make_storage(url, FAST)
    assert slept == [] and "retrying" not in caplog.text
    message = str(info.value)
    assert "\n" not in message and "***" in message
    assert secret not in message and postgres.password not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # nothing chained that holds the URL
    expected = {"wrong password": "password authentication failed", "unreachable host": "connect",
                "no such database": "does not exist", "missing driver": "plugin", "malformed URL": "not a valid"}[what]
    assert expected in message


def test_transient_outage_during_a_study_is_retried(postgres, postgres_url, caplog):
    storage = make_storage(postgres_url, FAST)
    study = optuna.create_study(study_name="outage", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    stopped = threading.Event()
    outage = threading.Thread(target=postgres.restart, kwargs={"down_seconds": 3.0, "stopped": stopped})
    with caplog.at_level(logging.WARNING, logger="search.storage"):
        outage.start()
        assert stopped.wait(60)  # the server is down now, for 3 s
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        outage.join()
    assert len(study.get_trials(states=[TrialState.COMPLETE])) == 3
    assert "retrying" in caplog.text
    assert postgres.password not in caplog.text


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # ask() on purpose
def test_dead_workers_trial_is_failed_and_requeued_with_its_parameters(storage_url):
    storage = make_storage(storage_url, FAST)
    study = optuna.create_study(study_name="dead", storage=storage)
    beating = study.ask()  # a worker that died after heartbeats: stale after the grace period
    beating.suggest_float("x", 0, 1)
    storage.record_heartbeat(beating._trial_id)
    silent = study.ask()  # a worker that died before its first heartbeat
    silent.suggest_float("x", 0, 1)
    alive = study.ask()
    alive.suggest_float("x", 0, 1)
    unsampled = study.ask()  # died after its first heartbeat, before sampling: no configuration to run again
    storage.record_heartbeat(unsampled._trial_id)
    time.sleep(FAST.grace_seconds + 1.5)
    storage.record_heartbeat(alive._trial_id)
    assert sorted(fail_dead_trials(study, storage_of(study))) == [beating.number, silent.number, unsampled.number]

    trials = study.get_trials()
    assert [t.state for t in trials[:4]] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL]
    assert all(trials[i].user_attrs["fail_reason"].startswith("worker lost") for i in (0, 1))
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert [r.system_attrs["failed_trial"] for r in retries] == [beating.number, silent.number]
    assert [r.params for r in retries] == [trials[0].params, trials[1].params]
    assert all("fail_reason" not in r.user_attrs for r in retries)
    assert fail_dead_trials(study, storage_of(study)) == []  # nothing twice


def test_an_interrupted_trial_is_requeued_with_its_parameters_up_to_max_retry(tmp_path, caplog):
    """Ctrl-C or SIGTERM (a preempted job) says nothing about the trial's parameters: it is
    queued again, once, until max_retry copies of it have been; the copy carries nothing its
    failed attempt recorded. Other failures and finished trials are left alone."""
    study = optuna.create_study(study_name="int", storage=make_storage(f"sqlite:///{tmp_path / 'int.db'}", FAST))

    def ended(state, reason=None):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr("curve", [0.5, 0.6])  # what a run records as it goes
        trial.storage.set_trial_system_attr(trial._trial_id, "NSGAIISampler:generation", 3)
        if reason is not None:
            trial.set_user_attr("fail_reason", reason)
        study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
        return study.trials[trial.number]

    study.enqueue_trial({"x": 0.25}, user_attrs={"reference_config": "Exp1"})
    interrupted = ended(TrialState.FAIL, "interrupted (Ctrl-C or SIGTERM)")
    assert interrupted.user_attrs["reference_config"] == "Exp1"
    for other in (ended(TrialState.FAIL, "RuntimeError: diverged"), ended(TrialState.COMPLETE)):
        requeue_interrupted(study, other, max_retry=1)
    assert study.get_trials(states=[TrialState.WAITING]) == []

    requeue_interrupted(study, interrupted, max_retry=1)
    requeue_interrupted(study, interrupted, max_retry=1)  # e.g. another worker failed it as dead and re-queued it
    (copy,) = study.get_trials(states=[TrialState.WAITING])
    assert copy.params == interrupted.params
    assert copy.user_attrs == {"reference_config": "Exp1"}
    assert copy.system_attrs == {"failed_trial": interrupted.number, "retry_history": [interrupted.number], "fixed_params": {"x": 0.25}}

    retry = study.ask()  # the copy runs next, and is interrupted too: max_retry (1) is reached
    assert retry.number == copy.number and retry.params == interrupted.params
    retry.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
    study.tell(retry, state=TrialState.FAIL)
    with caplog.at_level(logging.WARNING, logger="search.storage"):
        requeue_interrupted(study, study.trials[retry.number], max_retry=1)
    assert study.get_trials(states=[TrialState.WAITING]) == []
    assert f"trial {retry.number}: interrupted; not retried (distributed.max_retry=1 reached)" in caplog.text


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # ask() on purpose
@pytest.mark.parametrize("sampled_before_death", [0, 1])
def test_a_queued_reference_trial_whose_worker_died_while_sampling_it_is_queued_again_whole(tmp_path, sampled_before_death):
    """A warm-start reference has its parameters before they are sampled (``fixed_params``): lost
    with its worker it would never run (warm_start queues each reference once), and a copy of only
    its sampled part would run another configuration under the reference's name."""
    study = optuna.create_study(study_name="ref", storage=make_storage(f"sqlite:///{tmp_path / 'ref.db'}", FAST))
    study.enqueue_trial({"x": 0.25, "y": 0.75}, user_attrs={"reference_config": "Exp1"})
    taken = study.ask()  # popped by a worker that died before its claim had sampled it all
    for name in ("x", "y")[:sampled_before_death]:
        taken.suggest_float(name, 0, 1)
    study._storage.record_heartbeat(taken._trial_id)
    time.sleep(FAST.grace_seconds + 1.5)
    assert fail_dead_trials(study, storage_of(study)) == [taken.number]
    retry = study.ask()
    assert retry.number == taken.number + 1
    assert (retry.suggest_float("x", 0, 1), retry.suggest_float("y", 0, 1)) == (0.25, 0.75)
    assert retry.user_attrs == {"reference_config": "Exp1"}
    assert study.trials[retry.number].system_attrs["failed_trial"] == taken.number


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # ask() on purpose
def test_a_trial_copied_by_its_interrupted_worker_is_not_copied_again_when_failed_as_dead(tmp_path):
    """The interrupted worker queues the copy while the trial still runs, then dies before it can
    fail it (SIGKILL after SIGTERM): the next worker fails it as dead, and finds the copy."""
    study = optuna.create_study(study_name="both", storage=make_storage(f"sqlite:///{tmp_path / 'both.db'}", FAST))
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study._storage.record_heartbeat(trial._trial_id)
    trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
    requeue_interrupted(study, study.trials[trial.number], max_retry=2)
    assert [t.system_attrs["failed_trial"] for t in study.get_trials(states=[TrialState.WAITING])] == [trial.number]
    time.sleep(FAST.grace_seconds + 1.5)
    assert fail_dead_trials(study, storage_of(study)) == [trial.number]
    assert [(t.state, t.params) for t in study.get_trials()] == [(TrialState.FAIL, trial.params), (TrialState.WAITING, trial.params)]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # ask() on purpose
def test_an_interrupted_worker_and_a_worker_failing_its_trial_as_dead_at_once_queue_one_copy(storage_url, monkeypatch):
    """The interrupted worker's heartbeat was already stale (a job suspended, then SIGTERMed): it
    and another worker, failing the trial as dead, re-queue it at the same moment. Each checks for
    a copy, then inserts one; unless the two steps hold one lock, both checks find none."""
    from search.storage import RequeueTrial
    from search.workers import INTERRUPTED

    study = optuna.create_study(study_name="race", storage=make_storage(storage_url, FAST))
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr("fail_reason", INTERRUPTED)
    frozen = study.trials[trial.number]
    both_checked = threading.Barrier(2, timeout=3)
    add_trial = optuna.Study.add_trial

    def add_once_both_checked(self, template):
        try:  # under the lock the other re-queue is still waiting for it: this wait times out
            both_checked.wait()
        except threading.BrokenBarrierError:
            pass
        return add_trial(self, template)

    monkeypatch.setattr(optuna.Study, "add_trial", add_once_both_checked)
    errors: list[BaseException] = []

    def requeue(cause: str) -> None:
        try:
            RequeueTrial(max_retry=2, cause=cause)(study, frozen)
        except BaseException as err:
            errors.append(err)

    racers = [threading.Thread(target=requeue, args=(cause,)) for cause in ("interrupted", "its worker died")]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)
    assert not errors
    copies = study.get_trials(states=[TrialState.WAITING])
    assert [(t.system_attrs["failed_trial"], t.params) for t in copies] == [(trial.number, trial.params)]  # before: two


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # ask() on purpose
def test_a_requeue_whose_commit_reply_was_lost_queues_one_copy(tmp_path, monkeypatch):
    """The INSERT of the copy commits, then the connection drops before the reply: retrying the
    INSERT alone would queue the trial twice; retrying the whole re-queue finds the copy."""
    import sqlite3

    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    from search.storage import ResilientRDBStorage, call_with_retry

    study = optuna.create_study(study_name="lost", storage=make_storage(f"sqlite:///{tmp_path / 'lost.db'}", FAST))
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
    lost: list[int] = []

    def reply_lost_once(self, study_id, template_trial=None):  # ResilientRDBStorage's own wrapper, around a flaky INSERT
        def insert():
            created = RDBStorage._create_new_trial(self, study_id, template_trial)
            if not lost:
                lost.append(created.number)
                raise sqlalchemy.exc.OperationalError("INSERT INTO trials", {}, sqlite3.OperationalError("database is locked"))
            return created

        return call_with_retry(insert, retry_seconds=self.retry_seconds, what="_create_new_trial")

    monkeypatch.setattr(ResilientRDBStorage, "_create_new_trial", reply_lost_once)
    requeue_interrupted(study, study.trials[trial.number], max_retry=2)
    assert lost  # the reply was lost once
    copies = study.get_trials(states=[TrialState.WAITING])
    assert [(t.system_attrs["failed_trial"], t.params) for t in copies] == [(trial.number, trial.params)]


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from search.config import DistributedConfig
    from search.storage import make_storage
    from search.study_lock import study_lock
    storage = make_storage(sys.argv[1], DistributedConfig())
    lock = study_lock(storage, "locked", fallback_dir=None)
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_study_lock_is_exclusive_and_dies_with_its_holder(storage_url, tmp_path):
    make_storage(storage_url, FAST)  # tables exist before two processes race to create them
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, storage_url], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = study_lock(make_storage(storage_url, FAST), "locked", fallback_dir=tmp_path)
        acquired = threading.Event()
        waiter = threading.Thread(target=lambda: (lock.acquire(), acquired.set()), daemon=True)
        waiter.start()
        assert not acquired.wait(1.5)  # held elsewhere
        os.kill(holder.pid, signal.SIGKILL)
        assert acquired.wait(20)  # released by the server / kernel when its holder died
        lock.release()
        other = study_lock(make_storage(storage_url, FAST), "another study", fallback_dir=tmp_path)
        with other:
            pass
    finally:
        holder.kill()
        holder.wait()


def test_each_study_and_purpose_has_a_lock_of_its_own(storage_url):
    """Held: study "X"'s re-queue lock. Free: every other lock, including those of studies whose
    names a naive key would map onto it ("X/requeue", "X_requeue") or onto each other ("a b", "a_b")."""
    storage = make_storage(storage_url, FAST)
    held = [study_lock(storage, "X", fallback_dir=None, purpose="requeue"), study_lock(storage, "a b", fallback_dir=None)]
    for lock in held:
        lock.acquire()
    try:
        for name, purpose in [("X", "trials"), ("X/requeue", "trials"), ("X_requeue", "trials"), ("X_requeue", "requeue"),
                              ("a_b", "trials"), ("a b", "requeue")]:
            other = study_lock(make_storage(storage_url, FAST), name, fallback_dir=None, purpose=purpose)
            acquired = threading.Event()
            threading.Thread(target=lambda: (other.acquire(), acquired.set(), other.release()), daemon=True).start()
            assert acquired.wait(10), f"{name!r} ({purpose}) waits on another study's lock"
    finally:
        for lock in held:
            lock.release()


def test_distributed_config_is_validated():
    assert DistributedConfig(heartbeat_interval=10).grace_seconds == 40
    assert DistributedConfig(heartbeat_interval=None).grace_seconds is None
    for bad in (dict(heartbeat_interval=0), dict(heartbeat_interval=10, grace_period=5), dict(max_retry=-1),
                dict(heartbeat_interval=None, grace_period=10), dict(connect_timeout=0)):
        with pytest.raises(ValueError):
            DistributedConfig(**bad)


def test_workers_opening_a_new_study_at_the_same_moment_all_get_it(storage_url, tmp_path):
    """A SLURM array's tasks start together on a fresh database: the schema, the study, its
    metric names, its stored definition and the arguments that name it are each written once,
    and no task fails."""
    import dataclasses

    from search import load_study_config
    from search.study import DEFINITION_ATTR, open_study
    from search.study_args import remember_study_args, study_args

    config = load_study_config(REPO / "studies" / "demo.yaml", storage=storage_url)
    config = dataclasses.replace(config, workdir=tmp_path / "work")
    errors, barrier, opened = [], threading.Barrier(8), threading.Barrier(8)

    def worker():
        barrier.wait()
        try:
            study = open_study(config)
            opened.wait(60)  # then all write the arguments that name it at once
            remember_study_args(study, "--study studies/demo.yaml")
        except Exception as err:  # noqa: BLE001 - what the test counts
            errors.append(repr(err))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    study = optuna.load_study(study_name=config.name, storage=storage_url)
    assert study.metric_names == config.metric_names and DEFINITION_ATTR in study.user_attrs
    assert study_args(study) == "--study studies/demo.yaml"


def test_stored_study_arguments_never_hold_a_literal_password():
    """They are shown in every trial note: a ``${VAR}`` stays a reference, a path with spaces is quoted."""
    import shlex

    from search.study_args import format_study_args

    shown = format_study_args("my studies/ff.yaml", storage="postgresql://fair:s3cret@${DB_HOST}/optuna", study_name="ff 1")
    assert "s3cret" not in shown
    assert shlex.split(shown) == ["--study", "my studies/ff.yaml", "--storage", "postgresql://fair:***@${DB_HOST}/optuna",
                                  "--study-name", "ff 1"]
    assert shlex.split(format_study_args("s.yaml", storage="${FAIRFRONT_STORAGE}")) == ["--study", "s.yaml", "--storage", "${FAIRFRONT_STORAGE}"]


def test_a_read_only_storage_is_read_and_a_write_to_it_fails_in_one_line_naming_it(storage_url, request):
    """A shared read-only copy (SQLite's mode=ro, a PostgreSQL standby or read-only database):
    reading works, and a write is one StorageError naming the storage (no password), not
    Optuna's "invalid data in the commit, e.g. exceeding max length"."""
    from sqlalchemy.engine import make_url

    study = optuna.create_study(study_name="ro", storage=make_storage(storage_url, FAST), directions=["maximize"])
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                                              value=0.25))
    require_write_access(study)  # passes on the writable storage, changing nothing
    reloaded = optuna.load_study(study_name="ro", storage=make_storage(storage_url, FAST))
    assert (reloaded.user_attrs, [t.value for t in reloaded.trials]) == ({}, [0.25])
    if storage_url.startswith("sqlite"):
        read_only = f"sqlite:///file:{make_url(storage_url).database}?mode=ro&uri=true"
    else:
        request.getfixturevalue("postgres")._admin(f'ALTER DATABASE "{make_url(storage_url).database}" SET default_transaction_read_only = on')
        read_only = storage_url
    storage = make_storage(read_only, FAST)
    assert [t.value for t in optuna.load_study(study_name="ro", storage=storage).trials] == [0.25]
    writes = {
        "probe for write access": lambda: require_write_access(optuna.load_study(study_name="ro", storage=storage)),
        "create a study": lambda: optuna.create_study(study_name="ro", storage=storage, load_if_exists=True, directions=["maximize"]),
        "set an attribute": lambda: optuna.load_study(study_name="ro", storage=storage).set_user_attr("k", 1),
        "ask a trial": lambda: optuna.load_study(study_name="ro", storage=storage).ask(),
    }
    for what, write in writes.items():
        with pytest.raises(StorageError, match="refuses writes") as caught:
            write()
        assert mask_url(read_only) in str(caught.value), what
        assert "exceeding max length" not in str(caught.value), what
        assert not make_url(storage_url).password or make_url(storage_url).password not in str(caught.value), what
    assert "read" in str(caught.value)


def test_a_role_without_select_is_told_it_may_not_read_and_one_with_select_only_that_it_may_not_write(postgres, postgres_url):
    """PostgreSQL answers both with SQLSTATE 42501 (insufficient privilege): a denied SELECT must not
    be reported as a read-only storage whose reads would work."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    study = optuna.create_study(study_name="grants", storage=make_storage(postgres_url, FAST), directions=["maximize"])
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                                              value=0.25))
    role = f"reader_{make_url(postgres_url).database[-20:]}".lower()
    postgres._admin(f"CREATE ROLE {role} LOGIN PASSWORD 'reader-pw'")
    reader = postgres.url(make_url(postgres_url).database, user=role, password="reader-pw")
    owner = sqlalchemy.create_engine(postgres_url)
    with pytest.raises(StorageError, match="permission denied for table version_info"):  # (caught at the open)
        make_storage(reader, FAST)

    with owner.begin() as connection:  # enough to open the storage, not to read a study
        connection.execute(sqlalchemy.text(f"GRANT SELECT ON version_info, alembic_version TO {role}"))
    with pytest.raises(StorageError, match="refuses this role's reads") as caught:
        optuna.load_study(study_name="grants", storage=make_storage(reader, FAST))
    assert "refuses writes" not in str(caught.value) and "reader-pw" not in str(caught.value)

    with owner.begin() as connection:
        connection.execute(sqlalchemy.text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
    owner.dispose()
    readable = optuna.load_study(study_name="grants", storage=make_storage(reader, FAST))
    assert [t.value for t in readable.trials] == [0.25]
    with pytest.raises(StorageError, match="refuses writes"):
        require_write_access(readable)
