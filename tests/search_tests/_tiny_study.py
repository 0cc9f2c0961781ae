"""A tiny real study shared by the dashboard, report and evaluate tests.

It is studies/demo.yaml shrunk (96 train / 48 val / 32 per held-out set, half fakes, 2 epochs, 4 random
trials) and run once per test session through the real ``search.optimize``, so every test
reads the same study: real trials, user attributes, notes, artifacts and checkpoints.
"""

from __future__ import annotations

import threading
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "studies" / "demo.yaml"

_lock = threading.Lock()
_built: dict[str, object] = {}


def write_tiny_study_yaml(directory: Path, *, name: str = "tiny", n_trials: int = 4) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data["name"] = name
    data["workdir"] = str(directory / "work")
    # Half fakes: with the demo's 80% and 2 epochs every trial stays one-class (infeasible), and
    # these tests need a Pareto front.
    data["data"] = {"synthetic": {"seed": 0, "n_train": 96, "n_val": 48, "n_test": 32, "fake_share": 0.5}}
    data["stage1"] = {**data.get("stage1", {}), "epochs": 1}
    data["training"] = {**data["training"], "num_epochs": 2, "batch_size": 16, "warmup_epochs": 0}
    data["sampler"] = {"name": "random", "seed": 0}
    data["stopping"] = {**data.get("stopping", {}), "degenerate_after_epochs": None}
    data["budget"] = {"n_trials": n_trials}
    data["warm_start"] = False
    data["distributed"] = {**data.get("distributed", {}), "workers": 1}  # the demo's 2 CPU workers: not here
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_study(tmp_path_factory):
    """(study_yaml, StudyConfig, optuna.Study) of the session's tiny study, optimised once."""
    with _lock:
        if "result" not in _built:
            import torch

            from search import load_study_config, optimize

            torch.set_num_threads(1)
            directory = tmp_path_factory.mktemp("tiny_study")
            path = write_tiny_study_yaml(directory)
            config = load_study_config(path)
            study = optimize(config, progress=False)
            _built["result"] = (path, config, study)
        return _built["result"]
