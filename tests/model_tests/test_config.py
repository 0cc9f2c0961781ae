"""The training-config YAML: the dataclasses are the schema; every bad input names its key."""

from pathlib import Path

import pytest
import yaml

from model.config import TrainRunConfig, load_train_config
from model.typed_config import ConfigError, load_yaml, to_dict

VALID = {
    "workdir": "work",
    "data": {"synthetic": {"seed": 0}},
    "backbone": {"name": "fairfront-tiny-vit", "weights": "random"},
    "training": {"lr": 3e-4, "num_epochs": 4},
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_change(section: str | None, key: str, value):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    (data if section is None else data.setdefault(section, {}))[key] = value
    return data


def test_valid_config_loads_with_paths_relative_to_the_file(tmp_path):
    config = load_train_config(write(tmp_path, VALID))
    assert isinstance(config, TrainRunConfig)
    assert config.workdir == (tmp_path / "work").resolve()
    assert config.training.num_epochs == 4
    assert config.training.lambda_fair == 0.15  # untouched keys keep the Exp3 defaults
    assert config.run_dir == config.workdir / "train"


def test_demo_training_config_loads():
    config = load_train_config(Path(__file__).parents[2] / "studies" / "demo_train.yaml")
    assert config.backbone.name == "fairfront-tiny-vit"


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    # PyYAML reads "1e-4" as a string; users write it anyway.
    config = load_train_config(write(tmp_path, with_change("training", "sinkhorn_blur", "1e-4")))
    assert config.training.sinkhorn_blur == 1e-4


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("training", "learning_rate", 0.1, r"training: unknown key\(s\) 'learning_rate'"),
        (None, "trainig", {}, r"unknown key\(s\) 'trainig'"),
        ("training", "lr", "fast", r"training.lr: expected a number, got 'fast'"),
        ("training", "num_epochs", 2.5, r"training.num_epochs: expected an integer"),
        ("training", "dropout", 1.5, r"training: dropout must be in \[0, 1\)"),
        ("training", "optimizer", "lion", r"training.optimizer: 'lion' is not one of"),
        ("training", "lr", -1.0, r"lr must be >= 0"),
        ("training", "weight_decay", float("inf"), r"training.weight_decay: expected a finite number, got inf"),
        ("training", "lambda_fair", float("nan"), r"training.lambda_fair: expected a finite number, got nan"),
        ("training", "gate_init_bias", "-inf", r"training.gate_init_bias: expected a finite number, got -inf"),
        ("training", "min_lr", -1.0, r"training: min_lr must be >= 0, got -1.0"),
        ("training", "momentum", -5.0, r"training: momentum must be >= 0, got -5.0"),
        ("stage1", "weight_decay", -1.0, r"stage1: weight_decay must be >= 0, got -1.0"),
        ("stage1", "lr", float("inf"), r"stage1.lr: expected a finite number, got inf"),
        ("model", "stage2_hidden_ratio", float("inf"), r"model.stage2_hidden_ratio: expected a finite number, got inf"),
        ("training", "early_stop_patience", 0, r"training: early_stop_patience must be >= 1 or null, got 0"),
        ("backbone", "weights", None, r"backbone: weights: give a local checkpoint path"),
        ("backbone", "weights", "", r"backbone.weights: expected a path, got ''"),
        ("data", "manifest", "x.csv", r"data: give exactly one of 'manifest' or 'synthetic'"),
        ("data", "attributes", {"gender": ["male", "fe/male"]}, r"data: attributes.gender: a code must be non-empty and without '/'"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path, section, key, value, message):
    path = write(tmp_path, with_change(section, key, value))
    with pytest.raises(ConfigError, match=message) as err:
        load_train_config(path)
    assert str(path) in str(err.value)


def test_missing_required_section(tmp_path):
    data = dict(VALID)
    del data["backbone"]
    with pytest.raises(ConfigError, match="backbone: required key is missing"):
        load_train_config(write(tmp_path, data))


def test_unset_environment_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("FAIRFRONT_TEST_WEIGHTS", raising=False)
    with pytest.raises(ConfigError, match=r"backbone.weights: environment variable \$\{FAIRFRONT_TEST_WEIGHTS\} is not set"):
        load_train_config(write(tmp_path, with_change("backbone", "weights", "${FAIRFRONT_TEST_WEIGHTS}")))


def test_a_relative_weights_path_is_relative_to_the_yaml_like_every_path(tmp_path, monkeypatch):
    (tmp_path / "studies" / "w").mkdir(parents=True)
    (tmp_path / "studies" / "w" / "tiny.pt").write_bytes(b"weights")
    data = with_change("backbone", "weights", "w/tiny.pt")
    (tmp_path / "studies" / "train.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    config = load_train_config(tmp_path / "studies" / "train.yaml")
    assert config.backbone.weights == tmp_path / "studies" / "w" / "tiny.pt"
    assert to_dict(config.backbone, relative_to=tmp_path / "exports")["weights"] == "../studies/w/tiny.pt"
    assert load_train_config(write(tmp_path, VALID)).backbone.weights == "random"
    monkeypatch.setenv("FAIRFRONT_TEST_WEIGHTS", "random")  # (a smoke test of a real study's ${CLIP_WEIGHTS})
    assert load_train_config(write(tmp_path, with_change("backbone", "weights", "${FAIRFRONT_TEST_WEIGHTS}"))).backbone.weights == "random"


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(path)


def test_a_key_given_twice_is_refused_with_its_line_but_anchors_may_be_overridden(tmp_path):
    # PyYAML keeps the last of two keys: a second `training:` block would drop the first's lr.
    text = yaml.safe_dump(VALID) + "training:\n  num_epochs: 2\n"
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: duplicate key 'training'") as err:
        load_train_config(path)
    assert f"line {len(text.splitlines()) - 1}," in str(err.value)  # the second block's
    path.write_text("training: {lr: 0.001, lr: 0.01}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr'"):
        load_train_config(path)
    path.write_text("? [a, b]\n: 1\n")  # an unhashable key: PyYAML's own error, not a TypeError
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: while constructing a mapping"):
        load_yaml(path)
    # a merge key's values are defaults that the mapping's own keys override, as YAML means them
    path.write_text("defaults: &d {lr: 0.001, num_epochs: 4}\ntraining:\n  <<: *d\n  num_epochs: 2\n")
    assert load_yaml(path)["training"] == {"lr": 0.001, "num_epochs": 2}


def test_a_yaml_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfetraining: {}\n")
    with pytest.raises(ConfigError, match=r"binary.yaml: not a UTF-8 text file \(byte 0"):
        load_train_config(path)


def test_a_gpu_index_the_machine_does_not_have_is_named(monkeypatch):
    import torch

    from model.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"training.device: 'cuda:2' was asked for but this machine has 2 visible GPU\(s\)"):
        resolve_device("cuda:2")
