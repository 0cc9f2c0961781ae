"""Each trial's files (best checkpoint, curve, metrics, config, log) in an Optuna artifact store,
so every worker on every node writes to one place and optuna-dashboard lists them per trial.

The default store is a folder (``artifacts:`` in the study YAML, default <workdir>/artifacts);
a shared filesystem or an S3-compatible store (optuna.artifacts.Boto3ArtifactStore) serves many
nodes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

log = logging.getLogger(__name__)

TRIAL_FILES = {
    "best.pt": "application/octet-stream",
    "curve.csv": "text/csv",
    "metrics.json": "application/json",
    "config.yaml": "text/yaml",
    "train.log": "text/plain",
}


def artifact_store(directory: Path) -> FileSystemArtifactStore:
    """The study's artifact store: the one place it is built, for trial uploads, the dashboard's
    server and attached files, and evaluate's checkpoint downloads (return an S3 store here to
    move all of them to a bucket). No I/O: readers need no write access; `optimize` makes the
    folder (search.study.open_study), and so does attaching a file."""
    return FileSystemArtifactStore(str(directory))


def upload_trial_outputs(store, trial: optuna.Trial, output_dir: Path) -> dict[str, str]:
    """Upload a run's output files; returns file name -> artifact id (also stored as a user attr)."""
    ids = {}
    for name, mimetype in TRIAL_FILES.items():
        path = output_dir / name
        if path.is_file():
            ids[name] = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype=mimetype)
    trial.set_user_attr("artifacts", ids)
    return ids


class TrialLog:
    """Copies everything logged during one trial into <output_dir>/train.log."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path, mode="w")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)

    def __enter__(self) -> "TrialLog":
        logging.getLogger().addHandler(self.handler)
        for name in ("model", "search"):  # our own loggers reach INFO even if the root is quieter
            package = logging.getLogger(name)
            if package.getEffectiveLevel() > logging.INFO:
                package.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
