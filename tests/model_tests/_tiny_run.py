"""studies/demo_train.yaml at a test's size: the training-config YAML the model tests start from."""

from pathlib import Path

import yaml

DEMO_TRAIN = Path(__file__).parents[2] / "studies" / "demo_train.yaml"


def tiny_train_data(directory: Path, *, n_train: int, n_val: int, n_test: int, stage1_epochs: int, training: dict) -> dict:
    """The demo's training config as a dict: workdir and outputs under ``directory``, a synthetic
    set of the given sizes, Stage 1 trained ``stage1_epochs`` epochs, ``training`` keys replaced.
    A test changes what else it needs, then writes it with :func:`write_train_yaml`."""
    data = yaml.safe_load(DEMO_TRAIN.read_text())
    data["workdir"] = str(directory / "work")
    data["output_dir"] = str(directory / "out")
    data["data"]["synthetic"] = {"seed": 0, "n_train": n_train, "n_val": n_val, "n_test": n_test}
    data["stage1"] = {"epochs": stage1_epochs}
    data["training"].update(training)
    return data


def write_train_yaml(directory: Path, data: dict) -> Path:
    path = directory / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
