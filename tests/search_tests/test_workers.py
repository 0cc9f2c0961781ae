"""Many workers on one real PostgreSQL study, through the real entry point
(``run_study.py optimize --workers K --storage '${FAIRFRONT_STORAGE}'``): the study ends with
exactly its budget of finished trials, a SIGKILLed worker's trial is failed and retried with
the same parameters, Ctrl-C leaves nothing RUNNING, and no password is ever printed.
Plus the docker files: compose parses as intended and every command it runs is valid."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import NamedTuple

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import run_study
from search.config import DistributedConfig
from search.storage import make_storage
from search.local_workers import assign_devices, cpu_threads, parse_devices
from search.processes import run_in_child

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "studies" / "demo.yaml"
DOCKER = REPO / "docker"
# Fast dead-worker detection for tests: heartbeat every second, dead after 3 s without one.
DISTRIBUTED = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 2, "connect_timeout": 5}


def _study_yaml(directory: Path, name: str, *, epochs: int) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data.update(name="workers", workdir=str(directory / "work"), warm_start=False, distributed=DISTRIBUTED)
    data["data"] = {"synthetic": {"seed": 0, "n_train": 96, "n_val": 48, "n_test": 32}}
    data["stage1"] = {"epochs": 1}
    data["training"].update(num_epochs=epochs, batch_size=16, warmup_epochs=0, T_0=1)
    data["sampler"] = {"name": "random", "seed": 0}
    data["stopping"] = {"degenerate_after_epochs": None}
    data["budget"] = {"n_trials": 4}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class StudyFiles(NamedTuple):
    short: Path  # 2 epochs: studies that run to their budget
    long: Path  # 24 epochs (~2 s a trial here): a trial SIGKILLed mid-way, the study still finishes
    endless: Path  # 1000 epochs: no trial can finish before a Ctrl-C arrives, however loaded the machine


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> StudyFiles:
    """Study YAMLs on one prepared workdir (data, caches, Stage 1 built once per module)."""
    import torch

    from model import prepare
    from search import load_study_config

    directory = tmp_path_factory.mktemp("workers")
    files = StudyFiles(*(_study_yaml(directory, name, epochs=epochs)
                         for name, epochs in (("short", 2), ("long", 24), ("endless", 1000))))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepare(load_study_config(files.short).base_run_config(), progress=False, with_test_caches=False)
    finally:
        torch.set_num_threads(threads)
    return files


class Run:
    """``run_study.py optimize`` in a subprocess (its own session, for Ctrl-C), output collected."""

    def __init__(self, study: Path, name: str, url: str, *extra: str, storage_arg: str = "${FAIRFRONT_STORAGE}") -> None:
        env = {**os.environ, "FAIRFRONT_STORAGE": url, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "run_study.py", "-q", "optimize", "--study", str(study), "--study-name", name,
                   "--storage", storage_arg, *extra]
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait(self, timeout: float = 240) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        self.reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _load(url: str, name: str, timeout: float = 120) -> optuna.Study:
    storage = make_storage(url, DistributedConfig(**DISTRIBUTED))
    deadline = time.monotonic() + timeout
    while True:
        try:
            return optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _running_trial(study: optuna.Study, run: Run, *, timeout: float = 150) -> optuna.trial.FrozenTrial:
    """A trial that has just started training: all its parameters are drawn, and its epochs take
    long enough that it is surely still running a moment later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.proc.poll() is None, run.output
        for trial in study.get_trials(states=[TrialState.RUNNING]):
            if "training" in trial.user_attrs and "curve" not in trial.user_attrs:
                return trial
        time.sleep(0.05)
    raise AssertionError("no trial started in time:\n" + run.output)


def _states(study: optuna.Study) -> dict[str, int]:
    states = [t.state.name for t in study.get_trials()]
    return {s: states.count(s) for s in set(states)}


@pytest.mark.slow
def test_four_workers_finish_exactly_the_budget_without_printing_the_password(study_files, postgres, postgres_url):
    short = study_files.short
    run = Run(short, "four", postgres_url, "--workers", "4", "--n-trials", "16")
    assert run.wait() == 0, run.output
    study = _load(postgres_url, "four")
    assert _states(study) == {"COMPLETE": 16}, run.output  # exactly the budget; no failure, nothing left running
    trials = study.get_trials()
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 16  # each worker draws its own trials
    assert len({t.user_attrs["worker"] for t in trials}) == 4
    assert study.user_attrs["worker_sessions"] == 4
    # artifacts of every trial, from every worker, in the one store
    artifact_dir = short.parent / "work" / "artifacts"
    for trial in trials:
        assert set(trial.user_attrs["artifacts"]) == {"best.pt", "curve.csv", "metrics.json", "config.yaml", "train.log"}
        assert all((artifact_dir / a).is_file() for a in trial.user_attrs["artifacts"].values())
    # no storage error and no password: not in the output, the trial files, or the stored attributes
    assert "storage:" not in run.output and "Traceback" not in run.output
    assert postgres.password not in run.output
    assert "fairfront:***@127.0.0.1" in run.output
    assert postgres.password not in json.dumps([t.user_attrs for t in trials])
    written = [p for p in (short.parent / "work" / "trials" / "four").rglob("*") if p.is_file() and p.suffix in (".log", ".yaml", ".json", ".csv")]
    assert len(written) >= 16  # (each trial's files: an empty list would check nothing)
    for path in written:
        assert postgres.password not in path.read_text(errors="replace"), path


def test_the_study_files_worker_count_is_the_default_on_sqlite(study_files, tmp_path):
    """distributed.workers: 2 (as in studies/demo.yaml) starts two processes without --workers,
    sharing a SQLite study; --workers 1 overrides it."""
    short = study_files.short
    data = yaml.safe_load(short.read_text())
    data["distributed"] = {**data["distributed"], "workers": 2}
    two = short.with_name("two.yaml")
    two.write_text(yaml.safe_dump(data, sort_keys=False))
    url = f"sqlite:///{tmp_path / 'two.db'}"
    run = Run(two, "two", url, "--n-trials", "4")
    assert run.wait() == 0, run.output
    trials = _load(url, "two").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, run.output
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    from search.dashboard import read_trial_note

    # a worker's trial note names the study as the command line did: the storage stays a reference
    note = read_trial_note(_load(url, "two"), trials[0])
    assert f"export --study {two} --storage '${{FAIRFRONT_STORAGE}}' --study-name two --pick trial:{trials[0].number}" in note
    run = Run(two, "one", url, "--n-trials", "2", "--workers", "1")
    assert run.wait() == 0, run.output
    assert len({t.user_attrs["worker"] for t in _load(url, "one").get_trials()}) == 1



def test_each_trial_of_two_concurrent_workers_equals_the_same_trial_trained_alone(study_files, tmp_path):
    """Issue 5's bar for K worker processes on one device: a trial trained beside another one (two
    CPU workers sharing the cores) gives exactly the values its configuration gives when trained
    alone, in one process at the trial's thread count (what `export`'s re-train line runs;
    degenerate trials too, which `export` refuses)."""
    import dataclasses

    import torch

    import model
    from search import load_study_config
    from search.export import retrain_threads, trial_train_config

    url = f"sqlite:///{tmp_path / 'side.db'}"
    run = Run(study_files.short, "side", url, "--workers", "2", "--n-trials", "4")
    assert run.wait() == 0, run.output
    trials = _load(url, "side").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, run.output
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    config = dataclasses.replace(load_study_config(study_files.short), name="side")
    threads = torch.get_num_threads()
    for trial in trials:
        alone = dataclasses.replace(trial_train_config(config, trial), output_dir=tmp_path / f"alone-{trial.number}")
        torch.set_num_threads(retrain_threads(trial))
        try:
            result = model.train(alone, progress=False, write_outputs=False)
        finally:
            torch.set_num_threads(threads)
        assert [result.best.val[m] for m in config.metric_names] == trial.values, trial.number
        assert (result.best.epoch, result.degenerate) == (trial.user_attrs["best_epoch"], trial.user_attrs["degenerate"])

@pytest.mark.slow
def test_sigkilled_worker_loses_no_trial_and_its_trial_is_retried(study_files, postgres_url):
    run = Run(study_files.long, "kill", postgres_url, "--workers", "3", "--n-trials", "6")
    study = _load(postgres_url, "kill")
    victim = _running_trial(study, run)
    completed_before = {t.number for t in study.get_trials(states=[TrialState.COMPLETE])}
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    time.sleep(0.5)
    assert study._storage.get_trial(victim._trial_id).state == TrialState.RUNNING  # killed mid-trial
    assert run.wait() == 0, run.output

    assert _states(study) == {"COMPLETE": 6, "FAIL": 1}, run.output  # the study still reaches its budget
    dead = study.trials[victim.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["fail_reason"].startswith("worker lost")
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert dead.params and retried[0].params == dead.params  # the same configuration, run again
    assert {t.number for t in study.get_trials(states=[TrialState.COMPLETE])} >= completed_before
    assert "died (signal 9)" in run.output


def test_fused_workers_share_the_budget_and_sample_distinct_trials(study_files, tmp_path):
    """--fuse K --workers 2: two fused processes claim their batches inside the one budget (8, not
    a multiple of 3) and under the study lock, each with its own sampler seed."""
    url = f"sqlite:///{tmp_path / 'fused.db'}"
    run = Run(study_files.short, "fused", url, "--workers", "2", "--fuse", "3", "--n-trials", "8")
    assert run.wait() == 0, run.output
    study = _load(url, "fused")
    assert _states(study) == {"COMPLETE": 8}, run.output
    trials = study.get_trials()
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 8
    assert study.user_attrs["worker_sessions"] == 2
    assert "fused trials each" in run.output


@pytest.mark.slow
def test_a_sigkilled_fused_worker_s_batch_is_failed_and_retried(study_files, postgres_url):
    run = Run(study_files.long, "fused-kill", postgres_url, "--workers", "2", "--fuse", "2", "--n-trials", "6")
    study = _load(postgres_url, "fused-kill")
    victim = _running_trial(study, run)
    worker = victim.user_attrs["worker"]
    os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
    time.sleep(0.5)
    batch = [t for t in study.get_trials(states=[TrialState.RUNNING]) if t.user_attrs.get("worker") == worker]
    assert victim.number in {t.number for t in batch}  # killed mid-batch: its trials are RUNNING, with no one to tell them
    assert run.wait() == 0, run.output

    states = _states(study)
    assert states["COMPLETE"] == 6 and states["FAIL"] == len(batch) and "RUNNING" not in states, (states, run.output)
    for dead in batch:
        dead = study.trials[dead.number]
        assert dead.state == TrialState.FAIL and dead.user_attrs["fail_reason"].startswith("worker lost")
        retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
        assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].params == dead.params


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_leaves_nothing_running(study_files, postgres_url):
    run = Run(study_files.endless, "interrupt", postgres_url, "--workers", "2", "--n-trials", "8")
    study = _load(postgres_url, "interrupt")
    interrupted = _running_trial(study, run)
    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    assert run.wait(90) == 130, run.output
    states = _states(study)
    assert "RUNNING" not in states and states.get("FAIL", 0) >= 1, (states, run.output)
    trial = study.trials[interrupted.number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"].startswith("interrupted")
    assert "Traceback" not in run.output
    _assert_requeued(study, trial, run)


@pytest.mark.parametrize("extra", [(), ("--fuse", "2")], ids=["serial", "fused"])
def test_sigterm_stops_a_single_process_worker_cleanly(study_files, tmp_path, extra):
    """One worker in this process (a SLURM array task, one pod per GPU): scancel / docker stop
    send SIGTERM, and its running trial must end FAIL, not stay RUNNING until a heartbeat check."""
    url = f"sqlite:///{tmp_path / 'term.db'}"
    run = Run(study_files.endless, "term", url, "--workers", "1", *extra)
    study = _load(url, "term")
    interrupted = _running_trial(study, run)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(90) == 130, run.output
    trial = study.trials[interrupted.number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"].startswith("interrupted"), run.output
    assert "RUNNING" not in _states(study) and "Traceback" not in run.output
    assert "optimize: interrupted" in run.output
    _assert_requeued(study, trial, run)


def _assert_requeued(study, trial, run) -> None:
    """A preempted job's trial is queued again with its parameters, to run first when the study continues."""
    copies = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
    assert [(t.state, t.params) for t in copies] == [(TrialState.WAITING, trial.params)], run.output
    assert f"trial {trial.number}: interrupted; re-queued with the same parameters" in run.output


def test_a_signal_that_lands_in_a_finalizer_still_stops_the_process():
    """Python swallows an exception raised inside ``__del__`` ("Exception ignored"): the
    KeyboardInterrupt a SIGTERM becomes there must be raised again outside, not lost."""
    code = textwrap.dedent("""
        import os, signal, time
        from search.processes import interrupts_as_keyboard

        class Finalizer:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10000):  # the handler runs in here
                    pass

        with interrupts_as_keyboard():
            try:
                Finalizer()
                start = time.monotonic()
                while time.monotonic() - start < 5:
                    pass
                print("lost")
            except KeyboardInterrupt:
                print("interrupted")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["interrupted"], proc.stderr


def test_a_third_signal_while_stopping_exits_at_once():
    """The second is ignored (the first one's clean-up is failing the running trials); a third
    must not need SIGKILL when that clean-up hangs on an unreachable database."""
    script = (
        "import os, signal, time\n"
        "from search.processes import interrupts_as_keyboard\n"
        "with interrupts_as_keyboard():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
        "    except KeyboardInterrupt:\n"
        "        print('first: interrupted', flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "        print('second: ignored', flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "        print('not reached', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout.split() == ["first:", "interrupted", "second:", "ignored"]
    assert "exiting now" in proc.stderr


def test_a_child_s_bad_input_keeps_its_type_and_message_and_a_crash_says_how_it_ended():
    """GPU prepare runs in a child (search.processes.run_in_child): a bad manifest there must still be
    the one-line user error (exit 2) of the parent's command."""
    with pytest.raises(ValueError, match="invalid literal for int"):
        run_in_child(int, "not a number", name="parse")
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        run_in_child(open, "/no-such-file", name="open")
    with pytest.raises(NotADirectoryError) as under_a_file:  # an OSError naming its file: bad input too
        run_in_child(os.mkdir, f"{__file__}/sub", name="mkdir")
    assert under_a_file.value.filename == f"{__file__}/sub"
    with pytest.raises(RuntimeError, match=r"close failed in its own process \(exit code 1\)"):
        run_in_child(os.close, -1, name="close")  # an OSError naming nothing (EBADF): a crash
    with pytest.raises(RuntimeError, match=r"crash failed in its own process \(exit code 3\)"):
        run_in_child(os._exit, 3, name="crash")
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        run_in_child(signal.raise_signal, signal.SIGKILL, name="killed")  # as the OOM killer would


def test_the_gpu_prepare_path_builds_the_study_s_inputs_in_a_spawned_child(tmp_path):
    """``--workers`` on a GPU prepares through run_in_child: the study config must cross to a fresh
    interpreter and the caches and Stage 1 it builds there must be on disk for the workers."""
    from search import load_study_config
    from search.local_workers import _prepare, worker_config

    config = worker_config(load_study_config(_study_yaml(tmp_path, "child", epochs=1)), "cpu")
    run_in_child(_prepare, config, False, name="fairfront-prepare")
    assert [m.parent.name for m in (config.workdir / "features").glob("*/meta.json")], "no complete feature cache"
    assert list(config.workdir.rglob("stage1*.pt")), "no Stage 1 checkpoint"


def _spawned_children(pid: int) -> list[int]:
    """Children of ``pid`` started by multiprocessing's spawn (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


SLOW_CLEAN_UP = """
import time
from pathlib import Path

def build(marker):
    Path(marker).write_text("building")
    try:
        time.sleep(300)
    finally:  # as a cache build removes its partial folder
        time.sleep(3)
        Path(marker).write_text("cleaned up")
"""


@pytest.mark.parametrize("how", ["SIGTERM to the parent", "Ctrl-C twice in a terminal"])
def test_an_interrupted_parent_stops_the_child_it_waits_for_and_the_child_cleans_up(tmp_path, how):
    """``--workers`` on a GPU prepares in a child. A SIGTERM (docker stop, scancel) reaches only the
    parent, which used to wait for the child's whole cache build. A terminal's Ctrl-C reaches both:
    the user's second one must not end the child's clean-up."""
    (tmp_path / "slow_clean_up.py").write_text(SLOW_CLEAN_UP)
    marker = tmp_path / "marker"
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import slow_clean_up\n"
        "from search.processes import interrupts_as_keyboard, run_in_child\n"
        "with interrupts_as_keyboard():\n"
        "    try:\n"
        f"        run_in_child(slow_clean_up.build, {str(marker)!r}, name='builder')\n"
        "    except KeyboardInterrupt:\n"
        "        sys.exit(130)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        children = _spawned_children(proc.pid)
        assert children and marker.exists(), "the child never started"
        if how == "SIGTERM to the parent":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(1)
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "stopping builder" in err
    assert marker.read_text() == "cleaned up", err
    assert not any(Path(f"/proc/{c}").exists() for c in children), "the child outlived its parent"


@pytest.mark.parametrize("where", ["bad password from the environment", "unreachable host given literally"])
def test_a_storage_that_cannot_be_opened_is_one_masked_error(study_files, postgres, where, monkeypatch, capfd, caplog):
    short = study_files.short
    secret = "Wr0ng-" + os.urandom(4).hex()
    if where.startswith("bad password"):
        monkeypatch.setenv("FAIRFRONT_STORAGE", postgres.url("postgres", password=secret))
        argv = ["--storage", "${FAIRFRONT_STORAGE}", "--workers", "2"]
    else:
        argv = ["--storage", postgres.url("postgres", password=secret, port=1)]
    code = run_study.main(["-q", "optimize", "--study", str(short), "--study-name", "nope", *argv])
    out, err = capfd.readouterr()
    assert code == 2
    everything = out + err + caplog.text
    assert secret not in everything and postgres.password not in everything
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot open the study storage postgresql+psycopg://fairfront:***@127.0.0.1" in errors[0]
    assert "Traceback" not in everything


def _heavy_modules_loaded(queue) -> None:
    import sys

    queue.put(sorted(m for m in ("torch", "optuna", "open_clip", "search.study") if m in sys.modules))


def test_cpu_workers_start_with_the_heavy_imports_done():
    """K CPU workers fork from one server that imported them, instead of K processes importing
    torch, optuna and open_clip at once on the same cores."""
    from search.local_workers import _worker_context

    context = _worker_context(gpu=False)
    queue = context.SimpleQueue()
    worker = context.Process(target=_heavy_modules_loaded, args=(queue,))
    worker.start()
    worker.join(120)
    assert queue.get() == ["open_clip", "optuna", "search.study", "torch"]


def test_devices_are_assigned_round_robin_and_cpu_threads_shared():
    assert parse_devices("cpu", "auto") == ["cpu"]
    assert parse_devices(None, "cpu") == ["cpu"]  # the study asks for the CPU: respected
    assert parse_devices(None, "auto") in (["cpu"], [f"cuda:{i}" for i in range(16)][: len(parse_devices(None, "auto"))])
    assert assign_devices(5, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(["cpu"] * 4) == max(1, cores // 4)
    assert cpu_threads(["cuda:0", "cpu"]) == cores
    for bad in ("x", "cuda:x", "99"):
        with pytest.raises(ValueError, match="--devices"):
            parse_devices(bad, "auto")


# --- docker/ (no engine here: parse the files, and run every command they would run) ----------------


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_db_dashboard_and_gpu_workers_with_secrets_from_a_git_ignored_env_file():
    services = _compose()["services"]
    assert {"db", "dashboard", "worker"} <= set(services)
    db = services["db"]
    assert db["healthcheck"]["test"] and "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert any(str(v).endswith("/var/lib/postgresql/data") for v in db["volumes"])
    assert "ports" not in db  # the database is not published by default
    for name in ("dashboard", "worker"):
        assert services[name]["depends_on"]["db"]["condition"] == "service_healthy"
    for service in services.values():
        assert service["env_file"] == [".env"] or service["env_file"] == ".env"
        assert "FAIRFRONT_STORAGE" not in json.dumps(service.get("environment", {})) or "${" not in json.dumps(service.get("environment", {}))
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port
    assert services["dashboard"]["ports"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO).returncode == 0
    assert ignored and (DOCKER / "env.example").is_file()
    example = (DOCKER / "env.example").read_text()
    assert "FAIRFRONT_STORAGE=" in example and "POSTGRES_PASSWORD=" in example


def test_the_real_study_resolves_inside_the_containers_to_the_data_mount_and_a_writable_workdir(monkeypatch):
    from search import load_study_config

    example = dict(line.split("=", 1) for line in (DOCKER / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    worker = _compose()["services"]["worker"]
    # "source:target[:mode]", where a source may be "${VAR:-default}"
    mounts = {target: (source, mode) for source, target, mode in
              (re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(ro|rw))?", volume).groups() for volume in worker["volumes"])}
    assert mounts["/data"] == ("${FAIRFRONT_DATA_HOST:-../data}", "ro") and mounts["/opt/fairfront/runs"][1] is None
    for name, value in {**example, **worker["environment"]}.items():  # compose: environment over env_file
        monkeypatch.setenv(name, value)
    config = load_study_config(REPO / "studies" / "ffpp_clip_vitl14.yaml")
    assert str(config.data.manifest).startswith("/data/")
    assert str(config.backbone.weights).startswith("/data/")
    assert str(config.workdir).startswith("/opt/fairfront/runs/")  # the writable volume


def test_every_command_the_image_runs_is_a_valid_run_study_invocation(capsys):
    """The entrypoint prints the run_study.py arguments it would exec; each must parse (--help)."""
    env = {**os.environ, "FAIRFRONT_STUDY": "studies/demo.yaml", "FAIRFRONT_STORAGE": "postgresql+psycopg://u:p@db/f",
           "FAIRFRONT_DRY_RUN": "1", "FAIRFRONT_WORKERS": "2"}
    services = _compose()["services"]
    commands = set(services["worker"]["command"]) | set(services["dashboard"]["command"]) | {"prepare"}
    checked = 0
    for command in sorted(c for c in commands if not c.startswith("-")):
        out = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), command], env=env, capture_output=True, text=True, check=True).stdout
        argv = json.loads(out.strip().splitlines()[-1])
        assert argv[0] == "run_study.py"
        assert "p@db" not in out  # the entrypoint passes the reference, not the URL
        args = run_study.build_parser().parse_args(argv[1:])  # every argument is known and well-typed
        assert args.command == (command if command != "worker" else "optimize")
        assert getattr(args, "storage", None) in (None, "${FAIRFRONT_STORAGE}")
        with pytest.raises(SystemExit) as exit_info:
            run_study.main([args.command, "--help"])
        assert exit_info.value.code == 0
        checked += 1
    assert checked == 3  # worker, dashboard, prepare
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert 'pip install --no-cache-dir -e ".[postgres]"' in dockerfile and "entrypoint.sh" in dockerfile
