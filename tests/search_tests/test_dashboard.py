"""The dashboard for real: notes and plots written by the study callback, optuna-dashboard's
JSON API serving the tiny study, and headless Chromium rendering its pages."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

try:
    from ._tiny_study import tiny_study
except ImportError:  # tests/search_tests is not a package
    from _tiny_study import tiny_study

from optuna.trial import TrialState

import run_study
from search import dashboard
from search._chromium import find_chromium

# What optuna-dashboard (and React) show when a page fails; none may be in a rendered page.
ERROR_TEXTS = ("Unexpected Application Error", "Failed to load", "Failed to fetch", "Traceback", "is not found", "SyntaxError")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_study(tmp_path_factory)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def _get_json(url: str):
    return json.loads(_get(url)[2])


def test_callback_wrote_a_note_and_curves_for_every_trial(tiny):
    _, config, study = tiny
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        note = dashboard.read_trial_note(study, trial)
        assert f"## Trial {trial.number}" in note
        for name in (*trial.params, "Gate", "Fair-term share", "Degenerate epochs", "Per-epoch curve", "F_MEO"):
            assert name in note, name
        assert "curves.png" in dashboard.trial_artifacts(study, trial)
        assert f"/artifacts/{study._study_id}/{trial._trial_id}/" in note  # the image is embedded in the note


def test_callback_saved_the_study_figures(tiny):
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    _, _, study = tiny
    figures = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    assert set(dashboard.GRAPH_IDS.values()) <= set(figures)
    for figure in figures.values():
        assert json.loads(figure)["data"] is not None  # whole, parseable JSON


def test_callback_never_fails_the_study(tiny, monkeypatch, caplog):
    _, config, study = tiny

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dashboard, "annotate_trial", broken)
    monkeypatch.setattr(dashboard, "refresh_study_plots", broken)
    dashboard.TrialAnnotator(config)(study, study.trials[0])  # logs, does not raise
    assert "disk full" in caplog.text


def test_serve_exposes_study_notes_plots_and_artifacts(tiny):
    _, config, study = tiny
    ready = threading.Event()
    found = {}

    def on_ready(url, server):
        found.update(url=url, server=server)
        ready.set()

    thread = threading.Thread(target=dashboard.serve, args=(config,), kwargs=dict(port=0, on_ready=on_ready), daemon=True)
    thread.start()
    assert ready.wait(60), "the dashboard did not start"
    try:
        url = found["url"]
        assert url.startswith("http://127.0.0.1:") and url.endswith(f"/dashboard/studies/{study._study_id}")
        base = url.split("/dashboard/")[0]
        summaries = _get_json(base + "/api/studies")["study_summaries"]
        assert [s["study_name"] for s in summaries] == [config.name]
        detail = _get_json(f"{base}/api/studies/{study._study_id}")
        assert detail["objective_names"] == config.metric_names
        # The tiny study has no infeasible trial, so the dashboard's front is Optuna's.
        assert sorted(t["number"] for t in detail["best_trials"]) == sorted(t.number for t in study.best_trials)
        assert {g["id"] for g in detail["plotly_graph_objects"]} >= set(dashboard.GRAPH_IDS.values())
        trial = detail["trials"][0]
        assert f"## Trial {trial['number']}" in trial["note"]["body"]
        names = {a["filename"]: a["artifact_id"] for a in trial["artifacts"]}
        assert {"best.pt", "train.log", "curves.png"} <= set(names)
        status, content_type, body = _get(f"{base}/artifacts/{study._study_id}/{trial['trial_id']}/{names['curves.png']}")
        assert status == 200 and content_type == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        found["server"].shutdown()
        thread.join(30)
    assert not thread.is_alive()


def test_the_optuna_dashboard_command_optimize_prints_serves_the_trials_artifacts(tiny):
    import shlex
    import socket
    import subprocess
    import time

    path, config, study = tiny
    given = f"--study {path}"
    line = next(c for c in run_study.next_commands(config, given, None) if c.startswith("optuna-dashboard "))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*shlex.split(line), "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        trial = study.best_trials[0]
        artifact = dashboard.trial_artifacts(study, trial)["curves.png"]
        url = f"http://127.0.0.1:{port}/artifacts/{study._study_id}/{trial._trial_id}/{artifact}"
        for _ in range(120):
            try:
                status, content_type, body = _get(url)
                break
            except urllib.error.HTTPError as err:  # (without the artifact folder: 400 "Cannot access to the artifacts")
                status, body = err.code, err.read()
                break
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.5)
        else:
            raise AssertionError("optuna-dashboard did not start")
        assert (status, body[:8]) == (200, b"\x89PNG\r\n\x1a\n"), body[:200]
    finally:
        server.terminate()
        server.wait(30)


def _no_error(dom: str) -> None:
    for text in ERROR_TEXTS:
        assert text not in dom, f"the page shows {text!r}"


CHROMIUM = pytest.mark.skipif(find_chromium() is None,
                              reason="headless Chromium not installed (Debian: apt-get install -y chromium; .ci/run does)")


def _not_blank(png, size=(1400, 1000)) -> None:
    from PIL import Image

    image = Image.open(png).convert("L")
    assert image.size == size
    lo, hi = image.getextrema()
    assert hi - lo > 100, "blank screenshot"


@CHROMIUM
def test_chromium_renders_the_study_page(tiny, tmp_path):
    _, config, study = tiny
    png, dom = dashboard.screenshot_study(config, tmp_path / "study.png", annotate=False, dump_dom=True)
    _not_blank(png)
    _no_error(dom)
    assert config.name in dom
    assert "Pareto Front" in dom
    for metric in config.metric_names:
        assert metric in dom
    assert "Hypervolume of the feasible front" in dom  # our figures, drawn by the page's plotly


@CHROMIUM
def test_dashboard_screenshot_command_and_trial_note(tiny, tmp_path):
    path, config, study = tiny
    number = study.best_trials[0].number
    page = f"/trials?numbers={number}"
    png = tmp_path / "trial.png"
    assert run_study.main(["-q", "dashboard", "--study", str(path), "--no-annotate", "--screenshot", str(png), "--page", page]) == 0
    _not_blank(png)
    _, dom = dashboard.screenshot_study(config, None, page=page, annotate=False, dump_dom=True)
    _no_error(dom)
    assert f"Trial {number}" in dom
    assert "Validation metrics at the best epoch" in dom  # the markdown note, rendered
    assert "curves.png" in dom  # listed among the trial's artifacts


def test_a_screenshot_path_that_is_no_image_is_refused_and_the_file_kept(tiny, tmp_path, capsys):
    """A mistyped --screenshot naming the study database must not delete it."""
    path, config, _ = tiny
    victim = tmp_path / "study.db"
    victim.write_bytes(b"a study database")
    assert run_study.main(["-q", "dashboard", "--study", str(path), "--no-annotate", "--screenshot", str(victim)]) == 2
    err = capsys.readouterr().err
    assert "--screenshot" in err and "not an image file name" in err
    assert victim.read_bytes() == b"a study database"


@CHROMIUM
def test_a_failed_screenshot_leaves_an_earlier_one_in_place(tiny, tmp_path, monkeypatch):
    from search import _chromium

    _, config, _ = tiny
    earlier = tmp_path / "front.png"
    earlier.write_bytes(b"earlier screenshot")
    monkeypatch.setattr(_chromium.subprocess, "run", lambda *a, **k: _chromium.subprocess.CompletedProcess(a, 1, "", "crashed"))
    with pytest.raises(RuntimeError, match="chromium wrote no screenshot"):
        dashboard.screenshot_study(config, earlier, annotate=False)
    assert earlier.read_bytes() == b"earlier screenshot"


def test_a_busy_or_impossible_port_is_one_line_not_a_traceback(tiny, capsys):
    import socket

    path, _, _ = tiny
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_study.main(["-q", "dashboard", "--study", str(path), "--no-annotate", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "in use" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        run_study.main(["-q", "dashboard", "--study", str(path), "--port", "70000"])
    assert exit_.value.code == 2 and "a TCP port is 0-65535" in capsys.readouterr().err


def test_a_trial_note_names_the_validation_groups_left_out_of_the_fairness_terms(tiny):
    import copy

    from search._notes import trial_note

    _, config, study = tiny
    trial = copy.deepcopy(study.best_trials[0])
    trial.user_attrs = {**trial.user_attrs, "val_groups_without_real": ["male/black", "female/asian"], "val_groups_without_fake": []}
    note = trial_note(trial, config)
    assert "without real samples**, left out of the FPR terms of F_FPR / F_MEO: male/black, female/asian." in note
    assert "without fake samples" not in note


def test_every_reader_and_writer_of_trial_files_uses_the_one_artifact_store(tiny, tmp_path, monkeypatch):
    """search.artifacts.artifact_store is the one place to swap in an S3 store (README,
    Artifacts): the dashboard's server, attached files and evaluate's checkpoint download go
    through it too, not only the trials' uploads."""
    from optuna.artifacts import FileSystemArtifactStore

    from search import artifacts, evaluate

    built = []

    class RecordingStore(FileSystemArtifactStore):
        def __init__(self, base_path):
            super().__init__(base_path)
            built.append(base_path)

    monkeypatch.setattr(artifacts, "FileSystemArtifactStore", RecordingStore)
    _, config, study = tiny
    trial = study.get_trials(states=(TrialState.COMPLETE,))[0]
    assert "best.pt" in trial.user_attrs["artifacts"]

    server, _ = dashboard.make_dashboard_server(config, port=0)
    server.server_close()
    assert len(built) == 1
    extra = tmp_path / "extra.txt"
    extra.write_text("attached")
    dashboard.attach_trial_file(study, config.artifact_dir, trial, extra)
    assert len(built) == 2
    checkpoint = evaluate.trial_checkpoint(trial, config.artifact_dir, tmp_path)
    assert len(built) == 3 and checkpoint.parent == tmp_path and checkpoint.stat().st_size > 0
    assert set(built) == {str(config.artifact_dir)}


def test_a_refused_attach_leaves_no_file_and_one_cut_short_keeps_its_file(tmp_path, monkeypatch):
    """Refused (read-only storage): nothing was recorded, so the new file goes. Cut short (a lost
    connection, Ctrl-C): the record may have been committed, and a record of a removed file would
    be a broken link in the dashboard, so the file stays."""
    import optuna

    from search.storage import StorageError, make_storage

    study = optuna.create_study(storage=make_storage(f"sqlite:///{tmp_path / 'study.db'}"), directions=["maximize"])
    study.add_trial(optuna.trial.create_trial(value=0.5))
    trial, note, artifacts = study.trials[0], tmp_path / "note.md", tmp_path / "artifacts"
    note.write_text("# trial 0\n")
    for error, files_left in ((StorageError("refuses writes"), 0), (ConnectionError("server closed the connection"), 1),
                              (KeyboardInterrupt(), 2)):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(study._storage, "set_study_system_attr", fail)
        with pytest.raises(type(error)):
            dashboard.attach_trial_file(study, artifacts, trial, note)
        assert len(list(artifacts.iterdir())) == files_left, error
