"""The study YAML: one test per bad input, each naming the key and the file."""

from pathlib import Path

import pytest
import yaml

from model.typed_config import ConfigError
from search.config import load_study_config

DEMO = Path(__file__).parents[2] / "studies" / "demo.yaml"


def demo_data() -> dict:
    return yaml.safe_load(DEMO.read_text())


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_studies_load():
    demo = load_study_config(DEMO)
    assert demo.metric_names == ["auc", "f_meo", "f_fpr"]
    assert demo.directions == ["maximize", "minimize", "minimize"]
    assert demo.storage_url == f"sqlite:///{demo.workdir / 'study.db'}"
    assert demo.sampler.name == "gp"
    for name in ("lr", "weight_decay", "lambda_fair", "sinkhorn_blur"):
        assert demo.search_space[name].log


def test_real_study_loads_with_its_placeholders(monkeypatch, tmp_path):
    monkeypatch.setenv("FAIRFRONT_STORAGE", "postgresql+psycopg://u:secret@db:5432/fairfront")
    monkeypatch.setenv("FAIRFRONT_DATA", str(tmp_path))
    monkeypatch.setenv("CLIP_WEIGHTS", str(tmp_path / "ViT-L-14.pt"))
    monkeypatch.setenv("FAIRFRONT_WORKDIR", str(tmp_path / "work"))
    config = load_study_config(DEMO.parent / "ffpp_clip_vitl14.yaml")
    assert config.workdir == tmp_path / "work"
    assert config.backbone.name == "ViT-L-14-quickgelu"
    assert set(config.data.test_manifests) == {"celebdf", "dfd", "dfdc"}
    assert config.training.num_epochs == 30


def mutate(path_keys, value):
    data = demo_data()
    node = data
    for key in path_keys[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path_keys[-1]]
    else:
        node[path_keys[-1]] = value
    return data


@pytest.mark.parametrize(
    "keys, value, message",
    [
        (["sampler", "nmae"], "x", r"sampler: unknown key\(s\) 'nmae'"),
        (["surch_space"], {}, r"unknown key\(s\) 'surch_space'"),
        (["budget", "n_trials"], "many", r"budget.n_trials: expected an integer, got 'many'"),
        (["search_space", "lr"], {"low": 1e-2, "high": 1e-4, "log": True}, r"search_space.lr: low \(0.01\) > high \(0.0001\)"),
        (["search_space", "weight_decay"], {"low": 0.0, "high": 0.1, "log": True}, r"search_space.weight_decay: a log range must be > 0"),
        (["search_space", "lambda_fair"], {"low": 0.01, "high": 1.0}, r"search_space.lambda_fair: must be sampled on a log scale"),
        (["search_space", "learning_rate"], {"low": 1e-4, "high": 1e-3, "log": True}, r"search_space.learning_rate: not a searchable training key"),
        (["search_space", "dropout"], {"low": 0.1}, r"search_space.dropout: a range needs both low and high"),
        (["search_space", "optimizer"], {"choices": []}, r"search_space.optimizer: choices must not be empty"),
        (["objectives"], [{"metric": "auroc"}], r"objectives\[0\]: metric 'auroc' is not one of"),
        (["objectives"], [{"metric": "auc", "direction": "up"}], r"objectives\[0\].direction: 'up' is not one of"),
        (["sampler", "name"], "cmaes", r"sampler.name: 'cmaes' is not one of"),
        (["stopping", "degenerate_after_epochs"], 0, r"stopping: degenerate_after_epochs must be >= 1"),
        (["training", "stop_if_degenerate_after"], 2, r"training.stop_if_degenerate_after: a study stops degenerate trials by stopping.degenerate_after_epochs"),
        (["distributed", "workers"], 0, r"distributed: workers must be >= 1"),
        (["distributed", "fuse"], 0, r"distributed: fuse must be >= 1"),
        (["search_space", "optimizer"], {"choices": ["adamw", "lion"]}, r"search_space.optimizer.choices\[1\]: 'lion' is not one of"),
        (["search_space", "batch_size"], {"choices": [16, "big"]}, r"search_space.batch_size.choices\[1\]: expected an integer, got 'big'"),
        (["search_space", "T_0"], {"low": 1.5, "high": 4}, r"search_space.T_0.low: T_0 is an integer, got 1.5"),
        (["search_space", "optimizer"], {"low": 1, "high": 2}, r"search_space.optimizer: optimizer is not numeric; give choices"),
        (["search_space", "compile_sinkhorn"], {"choices": [True, False]}, r"search_space.compile_sinkhorn: not a searchable training key"),
        (["search_space", "early_stop_patience"], {"low": 3, "high": 10}, r"search_space.early_stop_patience: not a searchable training key"),
        (["search_space", "batch_size"], {"choices": [1, 32]}, r"search_space: a trial with batch_size=1 would be an invalid training config \(batch_size must be >= 2"),
        (["search_space", "warmup_epochs"], {"low": 1, "high": 12}, r"search_space: a trial with warmup_epochs=12 would be an invalid training config \(warmup_epochs must be < num_epochs"),
        (["stopping", "record_degenerate_as"], "pruned", r"stopping.record_degenerate_as: pruned trials teach the gp sampler nothing"),
        (["search_space", "dropout"], {"low": 0.0, "high": 0.3, "step": 0}, r"search_space.dropout: step must be > 0, got 0"),
        (["search_space", "dropout"], {"low": 0.0, "high": 0.3, "step": -0.1}, r"search_space.dropout: step must be > 0"),
        (["search_space", "dropout"], {"low": 0.0, "high": 0.3, "step": 0.07}, r"search_space.dropout: step 0.07 does not divide high - low \(0.3 - 0.0\)"),
        (["search_space", "dropout"], {"low": 0.0, "high": 0.3, "step": 0.5}, r"search_space.dropout: step 0.5 does not divide"),
        (["search_space", "fair_min_group_size"], {"low": 2, "high": 9, "step": 2}, r"search_space.fair_min_group_size: step 2.0 does not divide high - low \(9.0 - 2.0\)"),
        (["training", "min_lr"], -1.0, r"training: min_lr must be >= 0, got -1.0"),
        (["search_space", "lr"], {"low": 1e-5, "high": float("inf"), "log": True}, r"search_space.lr.high: expected a finite number, got inf"),
        (["search_space", "dropout"], {"low": float("nan"), "high": 0.3}, r"search_space.dropout.low: expected a finite number, got nan"),
        (["budget", "max_failed_trials"], 0, r"budget: max_failed_trials must be >= 1"),
        (["distributed", "devices"], "banana", r"distributed: devices: 'banana' is not a GPU index, cuda:N or cpu"),
        (["distributed", "devices"], "0,gpu1", r"distributed: devices: 'gpu1' is not a GPU index"),
        (["training", "device"], "cuda:abc", r"training: device must be auto, cpu, cuda or cuda:N, got 'cuda:abc'"),
        (["name"], KeyError, r"name: required key is missing"),
        (["name"], "../../escaped", r"name: '../../escaped' cannot be a study name: its trials' folders are <workdir>/trials/<name>"),
        (["name"], "", r"name: '' cannot be a study name"),
        (["storage"], "${FAIRFRONT_UNSET_STORAGE}", r"storage: environment variable \$\{FAIRFRONT_UNSET_STORAGE\} is not set"),
    ],
)
def test_bad_study_yaml_names_the_key(tmp_path, monkeypatch, keys, value, message):
    monkeypatch.delenv("FAIRFRONT_UNSET_STORAGE", raising=False)
    path = write(tmp_path, mutate(keys, value))
    with pytest.raises(ConfigError, match=message) as err:
        load_study_config(path)
    assert str(path) in str(err.value)


def test_search_space_values_take_the_type_of_their_training_key(tmp_path):
    data = demo_data()
    data["search_space"] |= {"batch_size": {"choices": [16, 32]}, "head_lr_mult": {"choices": ["1", "2.5e0"]},
                             "T_0": {"low": 2, "high": 4}}
    space = load_study_config(write(tmp_path, data)).search_space
    assert space["batch_size"].choices == [16, 32] and all(type(c) is int for c in space["batch_size"].choices)
    assert space["head_lr_mult"].choices == [1.0, 2.5]


def test_a_combination_of_range_ends_that_breaks_the_config_names_both_keys(tmp_path):
    data = demo_data()
    data["search_space"] |= {"warmup_epochs": {"low": 0, "high": 5}, "num_epochs": {"low": 4, "high": 10}}
    with pytest.raises(ConfigError, match=r"a trial with num_epochs=4, warmup_epochs=5 would be an invalid training config"):
        load_study_config(write(tmp_path, data))
    data["search_space"]["warmup_epochs"]["high"] = 3
    assert load_study_config(write(tmp_path, data)).search_space["num_epochs"].low == 4


def test_storage_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRFRONT_TEST_STORAGE", "sqlite:////tmp/x.db")
    config = load_study_config(write(tmp_path, mutate(["storage"], "${FAIRFRONT_TEST_STORAGE}")))
    assert config.storage_url == "sqlite:////tmp/x.db"
    override = load_study_config(DEMO, storage="${FAIRFRONT_TEST_STORAGE}", study_name="other")
    assert override.storage_url == "sqlite:////tmp/x.db" and override.name == "other"
    with pytest.raises(ConfigError, match=r"--study-name: name: '\.\./other' cannot be a study name"):
        load_study_config(DEMO, study_name="../other")
    assert load_study_config(DEMO, study_name="ffpp/v2").name == "ffpp/v2"  # a subfolder of <workdir>/trials


def test_an_overridden_or_unused_storage_needs_no_yaml_variable(tmp_path, monkeypatch, capsys):
    """A node that only builds caches (prepare), or a try of the FF++ study on local SQLite
    (--storage), has no database URL or password to set."""
    import run_study

    monkeypatch.delenv("FAIRFRONT_UNSET_STORAGE", raising=False)
    path = write(tmp_path, mutate(["storage"], "${FAIRFRONT_UNSET_STORAGE}"))
    with pytest.raises(ValueError, match=r"storage: environment variable \$\{FAIRFRONT_UNSET_STORAGE\} is not set"):
        load_study_config(path)
    assert load_study_config(path, storage="sqlite:////tmp/local.db").storage_url == "sqlite:////tmp/local.db"
    data = yaml.safe_load(path.read_text())
    data["workdir"] = str(tmp_path / "work")
    data["data"]["synthetic"] = {"seed": 0, "n_train": 32, "n_val": 16, "n_test": 8}
    data["stage1"] = {"epochs": 1}
    path.write_text(yaml.safe_dump(data))
    assert run_study.main(["-q", "prepare", "--study", str(path)]) == 0, capsys.readouterr().err
    assert not list((tmp_path / "work").glob("*.db"))  # it opened no study


def test_bad_study_is_refused_by_the_cli_before_any_work(tmp_path, capsys):
    import run_study

    data = mutate(["search_space", "lr"], {"low": 1e-2, "high": 1e-4, "log": True})
    data["workdir"] = str(tmp_path / "work")
    path = write(tmp_path, data)
    assert run_study.main(["optimize", "--study", str(path)]) == 2
    assert "search_space.lr" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
