"""optuna-dashboard on a study: launcher, per-trial notes, study plots, screenshots.

    python run_study.py dashboard --study studies/demo.yaml [--host 127.0.0.1] [--port 8080]

What a trial shows in the dashboard (written by ``TrialAnnotator``, the study callback that
``search.optimize`` runs after every trial, and back-filled by the ``dashboard`` command):

* a markdown note: objectives, every validation metric at the best epoch, why it was stopped,
  gate range, fair-term share, degenerate epochs, hyperparameters, the per-epoch curve as a
  table and as an image (``curves.png``), test-set metrics once ``evaluate`` ran, and the
  command that exports it;
* artifacts: the run's files (uploaded by search/artifacts.py while the trial runs), and files
  added later (``curves.png``, ``evaluation.json``, exported YAMLs).

Optuna refuses to change a finished trial, and a study callback only sees finished ones, so the
later files are attached the way optuna-dashboard itself keeps trial artifacts in the study's
system attributes (``dashboard:artifacts:<trial_id>:<artifact_id>``, listed and served by its
trial artifact routes); the notes and plotly figures are study system attributes too.
Study-level plotly figures (hypervolume history, per-epoch curves of the Pareto and latest
trials, lambda_fair x sinkhorn_blur) are refreshed after every trial: optuna-dashboard 0.21
shows custom figures on the study page only, so the per-trial curves are one figure with a
legend entry per trial.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import tempfile
import time
import uuid
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import _figures
from search._chromium import DEFAULT_WINDOW, check_screenshot_path, chromium, find_chromium
from search._notes import trial_note
from search.artifacts import artifact_store
from search.config import StudyConfig
from search.storage import StorageError
from search.study_args import study_args

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"  # the dashboard has no login: local unless asked
DEFAULT_PORT = 8080
TRIAL_ARTIFACT_PREFIX = "dashboard:artifacts:"  # optuna-dashboard's per-trial key in study system attrs
GRAPH_IDS = {"hypervolume": "hypervolume-history", "curves": "epoch-curves", "blur_lambda": "lambda-fair-x-sinkhorn-blur"}


# -- trial artifacts and notes ------------------------------------------------------------------


def trial_artifacts(study: optuna.Study, trial: FrozenTrial) -> dict[str, str]:
    """filename -> artifact id of the files attached after the trial finished."""
    prefix = f"{TRIAL_ARTIFACT_PREFIX}{trial._trial_id}:"
    found = {}
    for key, value in study._storage.get_study_system_attrs(study._study_id).items():
        meta = json.loads(value) if key.startswith(prefix) and isinstance(value, str) else None
        if meta:
            found[meta["filename"]] = meta["artifact_id"]
    return found


def attach_trial_file(study: optuna.Study, artifact_dir: Path, trial: FrozenTrial, path: Path, *, mimetype: str | None = None,
                      replace: bool = True) -> str:
    """Attach a file to a (finished) trial's dashboard artifacts; a file of the same name is replaced.

    The earlier file is let go only once the new one is recorded, and a new file the storage
    refused (read-only) is removed again. A write cut short (a lost connection, Ctrl-C) keeps the
    new file: its record may have been committed, and a record of a removed file is a broken link
    in the dashboard, where an unrecorded file only takes disk space."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = artifact_store(artifact_dir)
    storage, prefix = study._storage, f"{TRIAL_ARTIFACT_PREFIX}{trial._trial_id}:"
    old = trial_artifacts(study, trial).get(path.name) if replace else None
    artifact_id = str(uuid.uuid4())
    with open(path, "rb") as handle:
        store.write(artifact_id, handle)
    guessed, encoding = mimetypes.guess_type(path.name)
    meta = {"artifact_id": artifact_id, "filename": path.name, "mimetype": mimetype or guessed or "application/octet-stream",
            "encoding": encoding}
    try:
        storage.set_study_system_attr(study._study_id, prefix + artifact_id, json.dumps(meta))
    except StorageError:
        _remove_quietly(store, artifact_id)
        raise
    if old is not None:
        storage.set_study_system_attr(study._study_id, prefix + old, json.dumps(None))  # what the dashboard's delete does
        _remove_quietly(store, old)
    return artifact_id


def _remove_quietly(store, artifact_id: str) -> None:
    try:
        store.remove(artifact_id)
    except Exception:  # noqa: BLE001 - a file already gone is not worth failing over
        pass


class _TrialRef:
    """What optuna_dashboard.save_note/get_note read from a live Trial; a FrozenTrial has no storage."""

    def __init__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.study, self.storage, self._trial_id = study, study._storage, trial._trial_id


def write_trial_note(study: optuna.Study, config: StudyConfig, trial: FrozenTrial, *, test: dict | None = None) -> str:
    """(Re)write the trial's dashboard note; keeps the test results of an earlier ``evaluate``."""
    from optuna_dashboard import save_note

    if test is None:
        from search.evaluate import load_test_results

        test = load_test_results(study).get(trial.number)
    curves = trial_artifacts(study, trial).get("curves.png")
    image = f"/artifacts/{study._study_id}/{trial._trial_id}/{curves}" if curves else None
    body = trial_note(trial, config, test=test, curves_url=image, study_args=study_args(study))
    save_note(_TrialRef(study, trial), body)
    return body


def read_trial_note(study: optuna.Study, trial: FrozenTrial) -> str:
    from optuna_dashboard import get_note

    return get_note(_TrialRef(study, trial))


def annotate_trial(study: optuna.Study, config: StudyConfig, trial: FrozenTrial) -> None:
    """The trial's curves image and note."""
    if trial.user_attrs.get("curve"):
        from search._report_plots import trial_curves_png

        with tempfile.TemporaryDirectory(prefix="fairfront-note-") as scratch:
            png = trial_curves_png(trial, Path(scratch) / "curves.png")
            attach_trial_file(study, config.artifact_dir, trial, png, mimetype="image/png")
    write_trial_note(study, config, trial)


def refresh_study_plots(study: optuna.Study, config: StudyConfig) -> None:
    """Overwrite the study's plotly figures (fixed ids, so each refresh replaces the last)."""
    from optuna_dashboard import save_plotly_graph_object

    view = _figures.StudyView.of(study, config.metric_names)
    figures = {"curves": _figures.epoch_curves_figure(view)}
    if len(study.directions) > 1:
        figures["hypervolume"] = _figures.hypervolume_figure(view)
    if {"lambda_fair", "sinkhorn_blur"} <= set(config.search_space):
        figures["blur_lambda"] = _figures.blur_lambda_figure(view)
    for key, figure in figures.items():
        save_plotly_graph_object(study, figure, graph_object_id=GRAPH_IDS[key])
    # Two workers refreshing at the same instant can interleave their chunks; the page survives a
    # broken figure, but rewrite it once so it does not stay broken until the next trial.
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    saved = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    for key, figure in figures.items():
        try:
            json.loads(saved.get(GRAPH_IDS[key], ""))
        except ValueError:
            save_plotly_graph_object(study, figure, graph_object_id=GRAPH_IDS[key])


class TrialAnnotator:
    """Study callback ``(study, frozen_trial)``: note + curves image for the trial, refreshed study
    plots. Cheap (well under a second on the demo) and never fails the study: errors are logged."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        start = time.perf_counter()
        for step, action in (("note", lambda: annotate_trial(study, self.config, trial)),
                             ("study plots", lambda: refresh_study_plots(study, self.config))):
            try:
                action()
            except Exception:  # noqa: BLE001 - a dashboard view must never fail a trial or the study
                log.warning("dashboard %s for trial %d failed; the study goes on", step, trial.number, exc_info=True)
        log.debug("dashboard annotations for trial %d: %.2f s", trial.number, time.perf_counter() - start)


def annotate_study(study: optuna.Study, config: StudyConfig, *, refresh: bool = False) -> int:
    """Back-fill notes of finished trials that have none (``refresh``: rewrite all); returns how many."""
    from optuna_dashboard._note import note_ver_key

    written = 0
    attrs = study._storage.get_study_system_attrs(study._study_id)  # once: it holds every note and figure
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    todo = [t for t in finished if refresh or note_ver_key(t._trial_id) not in attrs]
    if todo:
        log.info("writing dashboard notes for %d trials", len(todo))
    for trial in todo:
        try:
            annotate_trial(study, config, trial)
            written += 1
        except StorageError as err:  # read-only: every other note would fail the same way
            log.warning("dashboard notes not written: %s", err)
            return written
        except Exception:  # noqa: BLE001
            log.warning("dashboard note for trial %d failed", trial.number, exc_info=True)
    try:
        refresh_study_plots(study, config)
    except Exception:  # noqa: BLE001
        log.warning("dashboard study plots failed", exc_info=True)
    return written


def upload_export(study: optuna.Study, config: StudyConfig, trial: FrozenTrial, path: Path) -> str | None:
    """Attach an exported training-config YAML to the trial's dashboard artifacts (logged, never raised)."""
    try:
        return attach_trial_file(study, config.artifact_dir, trial, Path(path), mimetype="text/yaml")
    except StorageError as err:
        log.warning("%s is not attached to trial %d's dashboard artifacts: %s", path, trial.number, err)
        return None
    except Exception:  # noqa: BLE001 - the export itself succeeded; the dashboard copy is a convenience
        log.warning("could not attach %s to trial %d's dashboard artifacts", path, trial.number, exc_info=True)
        return None


# -- the server ---------------------------------------------------------------------------------


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("dashboard %s - %s", self.address_string(), format % args)


def study_url(host: str, port: int, study: optuna.Study) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    return f"http://{shown}:{port}/dashboard/studies/{study._study_id}"


def make_dashboard_server(config: StudyConfig, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> tuple[WSGIServer, str]:
    """An optuna-dashboard WSGI server on the study's storage and artifact store (not started);
    port 0 picks a free port. Returns (server, URL of the study page)."""
    from optuna_dashboard import wsgi

    from search.study import open_study

    study = open_study(config, create=False)
    app = wsgi(study._storage, artifact_store=artifact_store(config.artifact_dir))
    try:
        server = make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except OSError as err:  # a busy port, an address this machine does not have, an unknown host name
        raise ValueError(f"dashboard: cannot listen on {host}:{port}: {err.strerror or err}") from None
    return server, study_url(host, server.server_port, study)


def serve(config: StudyConfig, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, annotate: bool = True, on_ready=None) -> int:
    """Back-fill missing notes, then serve the dashboard until Ctrl-C (or ``server.shutdown()``).

    ``on_ready(url, server)`` is called once it listens; by default it prints the URL."""
    from search.study import open_study

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the dashboard has no login and can edit and delete studies: serving on %s exposes it to that network", host)
    server, url = make_dashboard_server(config, host=host, port=port)  # a busy port fails before any note is written
    try:
        if annotate:
            written = annotate_study(open_study(config, create=False), config)
            if written:
                log.info("dashboard notes written for %d trials", written)
        if on_ready is None:
            print(f"optuna-dashboard for study {config.name!r}: {url}  (Ctrl-C to stop)", flush=True)
        else:
            on_ready(url, server)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# -- headless screenshots -----------------------------------------------------------------------


def screenshot_study(config: StudyConfig, out: Path | None, *, page: str = "", window: tuple[int, int] = DEFAULT_WINDOW,
                     annotate: bool = True, dump_dom: bool = False) -> tuple[Path | None, str]:
    """Serve the dashboard on a free localhost port and render the study page (``page``: a
    sub-path such as ``/trials?numbers=3``) in headless Chromium: a screenshot to ``out`` (unless
    None) and, with ``dump_dom``, the rendered DOM. Returns (PNG path, DOM or "")."""
    import threading

    from search.study import open_study

    if out is not None:
        check_screenshot_path(out)
    if annotate:
        annotate_study(open_study(config, create=False), config)
    server, url = make_dashboard_server(config, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    dom = ""
    try:
        if out is not None:
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            chromium(url + page, screenshot=out, window=window)
        if dump_dom:
            dom = chromium(url + page, dump_dom=True, window=window)
    finally:
        server.shutdown()
        server.server_close()
    return out, dom


__all__ = [
    "TrialAnnotator",
    "annotate_study",
    "attach_trial_file",
    "chromium",
    "find_chromium",
    "make_dashboard_server",
    "read_trial_note",
    "refresh_study_plots",
    "screenshot_study",
    "serve",
    "study_url",
    "trial_artifacts",
    "upload_export",
    "write_trial_note",
]
