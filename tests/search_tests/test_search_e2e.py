"""A real multi-objective study on tiny synthetic data, through the real entry points."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

import objectives
import run_study
from search import load_study_config, open_study, pick_trial
from search.pareto import PickError
from search.study import DEFINITION_ATTR, start_worker, study_definition

DEMO = Path(__file__).parents[2] / "studies" / "demo.yaml"


def tiny_study_yaml(workdir: Path, path: Path, *, name="tiny", n_trials=6, **overrides) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    data.update(name=name, workdir=str(workdir), warm_start=False)
    data["distributed"] = {"workers": 1}  # one process: trials must reproduce exactly with `train`
    data["data"]["synthetic"] = {"seed": 0, "n_train": 160, "n_val": 80, "n_test": 16}
    data["stage1"] = {"epochs": 2}
    data["training"].update(num_epochs=3, warmup_epochs=1)
    data["sampler"] = {"name": "gp", "seed": 0, "n_startup_trials": 3}
    data["budget"] = {"n_trials": n_trials}
    data["stopping"] = {"degenerate_after_epochs": 2, "record_degenerate_as": "infeasible"}
    for key, value in overrides.items():
        data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    path = tiny_study_yaml(root / "work", root / "study.yaml")
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 0
    config = load_study_config(path)
    return path, config, open_study(config, create=False)


def test_storage_holds_a_three_objective_study_with_names_and_curves(study_run):
    _, config, study = study_run
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    assert study.metric_names == ["auc", "f_meo", "f_fpr"]
    finished = study.get_trials(states=[TrialState.COMPLETE, TrialState.PRUNED])
    assert len(finished) == 6
    for trial in finished:
        curve = trial.user_attrs["curve"]
        assert len(curve) == trial.user_attrs["epochs_run"] >= 1
        assert {"val_auc", "val_f_meo", "val_f_fpr", "gate_mean", "gate_min", "gate_max", "fair_share", "degenerate"} <= set(curve[0])
        for metric in objectives.METRIC_NAMES:
            assert f"val_{metric}" in trial.user_attrs
        assert trial.user_attrs["training"]["lr"] == trial.params["lr"]
        assert trial.user_attrs["seed"] == 0 and trial.user_attrs["code_version"]
        assert set(trial.user_attrs["artifacts"]) >= {"best.pt", "curve.csv", "metrics.json", "config.yaml", "train.log"}
        if trial.state == TrialState.COMPLETE:
            assert list(trial.values) == [trial.user_attrs[f"val_{m}"] for m in config.metric_names]


def test_show_prints_exactly_the_pareto_front(study_run, capsys):
    path, _, study = study_run
    assert run_study.main(["show", "--study", str(path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:] if line.strip()]
    assert sorted(int(r) for r in rows) == sorted(t.number for t in study.best_trials)


@pytest.mark.parametrize("pick", ["knee", "max-auc", "min-f_meo", "min-f_fpr", "max-ap", "auc >= 0.0", "f_meo<=1", " MAX-AUC ", "AUC >= 0.0"])
def test_every_pick_form_returns_a_pareto_trial(study_run, pick):
    """On a real study's stored trials (which trial each form picks: test_report's 5-point front)."""
    _, _, study = study_run
    trial = pick_trial(study, pick)
    assert trial.number in {t.number for t in study.best_trials}


def test_trial_pick_and_bad_picks(study_run):
    _, _, study = study_run
    number = study.best_trials[0].number
    assert pick_trial(study, f"trial:{number}").number == number
    for bad, message in [("trial:x", "expected trial"), ("trial:999", "no trial 999"), ("max-auroc", "unknown metric"),
                         ("auc >= 2", "no Pareto trial"), ("__import__('os')", "not understood"), ("auc ~ 1", "not understood")]:
        with pytest.raises(PickError, match=re.escape(message) if "(" not in message else message):
            pick_trial(study, bad)


def test_export_then_train_reproduces_the_trial(study_run, tmp_path, capsys, monkeypatch):
    import torch

    import model

    path, config, study = study_run
    out = tmp_path / "best.yaml"
    assert run_study.main(["export", "--study", str(path), "--pick", "knee", "--out", str(out)]) == 0
    trial = pick_trial(study, "knee")
    text = out.read_text()
    assert text.startswith("# fairfront export: study 'tiny', trial")
    assert f"trial {trial.number}" in text
    # the header's own command, from a process whose thread count differs from the trial's
    command = re.search(r"^# re-train: python run_study.py (.*)$", text, re.M).group(1).replace("<this file>", str(out)).split()
    assert command[-2:] == ["--threads", str(trial.user_attrs["torch_threads"])]
    threads, seen, real_train = torch.get_num_threads(), [], model.train
    monkeypatch.setattr(model, "train", lambda *a, **k: seen.append(torch.get_num_threads()) or real_train(*a, **k))
    torch.set_num_threads(trial.user_attrs["torch_threads"] + 1)
    try:
        assert run_study.main(["-q", *command, "--output-dir", str(tmp_path / "retrain")]) == 0
        assert seen == [trial.user_attrs["torch_threads"]] and torch.get_num_threads() == trial.user_attrs["torch_threads"] + 1
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((tmp_path / "retrain" / "metrics.json").read_text())
    assert [metrics["val"][m] for m in config.metric_names] == list(trial.values)
    assert metrics["best_epoch"] == trial.user_attrs["best_epoch"]
    assert f"with {trial.user_attrs['torch_threads']} torch threads" in text
    gate = metrics["gate"]  # the header's gate is the retrained model's
    assert f"gate at the best epoch {gate['min']:.3f}-{gate['max']:.3f} (mean {gate['mean']:.3f})" in text


def test_export_overwrites_an_earlier_export_but_never_the_study(study_run, tmp_path, capsys):
    path, config, study = study_run
    database = Path(yaml.safe_load(path.read_text())["workdir"]) / "study.db"
    for target, named in ((database, "is not a fairfront export"), (path, "is not a fairfront export"), (tmp_path, "is a folder")):
        before = target.read_bytes() if target.is_file() else None
        assert run_study.main(["export", "--study", str(path), "--out", str(target)]) == 2
        assert named in capsys.readouterr().err
        assert before is None or target.read_bytes() == before
    assert len(open_study(config, create=False).get_trials()) == len(study.get_trials())
    out = tmp_path / "best.yaml"
    for pick in ("max-auc", "knee"):  # the second replaces the first
        assert run_study.main(["export", "--study", str(path), "--pick", pick, "--out", str(out)]) == 0
    assert "picked by --pick 'knee'" in out.read_text()



def test_an_export_cut_short_leaves_the_earlier_one_whole(study_run, tmp_path, monkeypatch):
    """A full disk mid-write left a truncated export that still loaded, with defaults in place of
    the missing training keys, under the trial's header."""
    from search import export as export_module

    path, config, study = study_run
    out = tmp_path / "best.yaml"
    assert run_study.main(["-q", "export", "--study", str(path), "--pick", "max-auc", "--out", str(out)]) == 0
    earlier = out.read_bytes()
    real_write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_module.export_trial(study, config, pick_trial(study, "knee"), out, pick="knee")
    monkeypatch.undo()
    assert out.read_bytes() == earlier and sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml"]

def test_an_export_or_report_under_a_file_is_one_line_naming_the_path(study_run, tmp_path, capsys):
    path, _, _ = study_run
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for command, extra in (("export", ["--pick", "knee", "--out", str(a_file / "best.yaml")]), ("report", ["--out", str(a_file)])):
        assert run_study.main(["-q", command, "--study", str(path), *extra]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(a_file) in err and "Traceback" not in err
    assert a_file.read_text() == "not a folder"


def test_a_study_with_augmented_views_exports_a_config_that_reproduces_its_trial(tmp_path):
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name="views", n_trials=1,
                           augment={"views": 2, "hflip": 0.5, "jpeg": 0.5},
                           search_space={"lr": {"low": 1e-3, "high": 2e-3, "log": True}})  # out of the degenerate phase in 3 epochs
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 0
    study = open_study(load_study_config(path), create=False)
    assert study.user_attrs[DEFINITION_ATTR]["augment"]["views"] == 2
    out = tmp_path / "best.yaml"
    assert run_study.main(["export", "--study", str(path), "--pick", "trial:0", "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["augment"]["views"] == 2
    assert run_study.main(["-q", "train", "--config", str(out), "--output-dir", str(tmp_path / "retrain")]) == 0
    metrics = json.loads((tmp_path / "retrain" / "metrics.json").read_text())
    assert [metrics["val"][m] for m in ("auc", "f_meo", "f_fpr")] == study.trials[0].values


def test_an_export_runs_on_the_study_device_not_the_worker_pin(study_run):
    import copy

    from search.export import trial_train_config

    _, config, study = study_run
    trial = copy.deepcopy(pick_trial(study, "knee"))
    trial.user_attrs["training"] = {**trial.user_attrs["training"], "device": "cuda:3"}  # as a worker on GPU 3 stores it
    exported = trial_train_config(config, trial).training
    assert exported.device == config.training.device
    assert exported.lr == trial.params["lr"]


def test_continuing_adds_trials_and_keeps_the_old_ones(study_run, tmp_path, capsys):
    path, config, study = study_run
    before = {t.number: (t.state, t.values) for t in study.get_trials()}
    assert run_study.main(["-q", "optimize", "--study", str(path), "--n-trials", "7"]) == 0
    after = {t.number: (t.state, t.values) for t in open_study(config, create=False).get_trials()}
    assert len(after) == len(before) + 1
    assert all(after[n] == before[n] for n in before)
    # the same budget again: nothing to do, nothing overwritten
    capsys.readouterr()
    assert run_study.main(["-q", "optimize", "--study", str(path), "--n-trials", "7"]) == 0
    assert len(open_study(config, create=False).get_trials()) == len(after)
    threads = {t.user_attrs["torch_threads"] for t in open_study(config, create=False).trials}
    assert len(threads) == 1 and f"train --config best.yaml --threads {threads.pop()}\n" in capsys.readouterr().out


def test_next_retrain_threads_are_the_knee_trials():
    """optimize's `next:` train line re-trains what `export --pick knee` picks: its thread count,
    also when the study's CPU trials ran at several counts."""
    import optuna
    from optuna.trial import create_trial

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    assert run_study.knee_retrain_threads(study) is None  # no front yet
    for values, threads in [((0.9, 0.5, 0.5), 2), ((0.8, 0.1, 0.1), 1), ((0.7, 0.6, 0.6), 4)]:
        study.add_trial(create_trial(values=list(values), user_attrs={"device": "cpu", "torch_threads": threads}))
    knee = pick_trial(study, "knee")
    assert knee.values == [0.8, 0.1, 0.1]
    assert run_study.knee_retrain_threads(study) == 1
    study.add_trial(create_trial(values=[0.85, 0.05, 0.05], user_attrs={"device": "cuda:0", "torch_threads": 8}))
    assert run_study.knee_retrain_threads(study) is None  # a GPU trial is the knee now: no --threads


@pytest.mark.parametrize("section, key, value, named", [
    ("search_space", "lr", {"low": 1e-4, "high": 1e-2, "log": True}, "search_space.lr.low"),
    ("search_space", "dropout", {"choices": [0.0, 0.2]}, "search_space.dropout.choices"),
    ("training", "num_epochs", 5, "training.num_epochs"),
    ("objectives", None, [{"metric": "auc"}, {"metric": "f_dp"}, {"metric": "f_fpr"}], "objectives"),
    # the inputs: other synthetic data, features of another block, another Stage 1 adapter
    ("data", "synthetic", {"seed": 1, "n_train": 160, "n_val": 80, "n_test": 16}, "data.synthetic.seed"),
    ("backbone", "stage2_layer", 2, "backbone.stage2_layer"),
    ("stage1", "epochs", 3, "stage1.epochs"),
])
def test_continuing_with_a_changed_definition_is_refused_and_stores_nothing(study_run, tmp_path, capsys, section, key, value, named):
    path, config, study = study_run
    before = [(t.number, t.state, t.values) for t in open_study(config, create=False).get_trials()]
    data = yaml.safe_load(path.read_text())
    if key is None:
        data[section] = value
    else:
        data[section][key] = value
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    assert run_study.main(["-q", "optimize", "--study", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "was created with another definition" in err and named in err and "another --study-name" in err
    assert [(t.number, t.state, t.values) for t in open_study(config, create=False).get_trials()] == before


def _study_on_a_manifest(study_run, tmp_path: Path, name: str) -> tuple[Path, dict]:
    """The tiny study on a copy of its synthetic data given as data.manifest (YAML path, its dict)."""
    path, _, _ = study_run
    shutil.copytree(Path(yaml.safe_load(path.read_text())["workdir"]) / "data", tmp_path / "data")
    data = yaml.safe_load(path.read_text())
    data.update(name=name, workdir=str(tmp_path / "work"))
    data["data"] = {"manifest": str(tmp_path / "data" / "manifest.csv")}
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(data))
    return study_path, data


def test_a_worker_start_reads_the_train_val_manifest_once(study_run, tmp_path, monkeypatch):
    """The study's identity and prepare need the same manifest: one read and one check of its images."""
    import model.manifest as manifest_module

    study_path, _ = _study_on_a_manifest(study_run, tmp_path, "reads-once")
    reads, real_read = [], manifest_module._read
    monkeypatch.setattr(manifest_module, "_read", lambda p: reads.append(p) or real_read(p))
    start_worker(load_study_config(study_path), n_trials=None, timeout=None, progress=False)
    assert reads == [tmp_path / "data" / "manifest.csv"]


def test_a_manifest_edited_in_place_is_refused_and_its_study_kept(study_run, tmp_path, capsys):
    """The YAML is unchanged, the data is not: new trials would score on other labels."""
    study_path, data = _study_on_a_manifest(study_run, tmp_path, "from-manifest")
    assert run_study.main(["-q", "optimize", "--study", str(study_path), "--n-trials", "1"]) == 0
    config = load_study_config(study_path)
    before = [(t.number, t.state, t.values) for t in open_study(config, create=False).get_trials()]
    manifest = tmp_path / "data" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    path_, label, rest = lines[1].split(",", 2)
    # the same manifest on other images: another data.image_root where one image differs
    shutil.copytree(tmp_path / "data", tmp_path / "other-images")
    (tmp_path / "other-images" / path_).write_bytes((tmp_path / "data" / path_).read_bytes() + b"\0")
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(yaml.safe_dump({**data, "data": {**data["data"], "image_root": str(tmp_path / "other-images")}}))
    capsys.readouterr()
    assert run_study.main(["-q", "optimize", "--study", str(elsewhere), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "was created with another definition" in err and "data.image_sizes_sha256" in err and "manifest_sha256" not in err
    assert [(t.number, t.state, t.values) for t in open_study(config, create=False).get_trials()] == before
    lines[1] = ",".join((path_, "1" if label == "0" else "0", rest))  # one label corrected
    manifest.write_text("\n".join(lines) + "\n")
    assert run_study.main(["-q", "optimize", "--study", str(study_path), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "was created with another definition" in err and "data.manifest_sha256" in err
    assert [(t.number, t.state, t.values) for t in open_study(config, create=False).get_trials()] == before


@pytest.mark.parametrize("section, key, keeps, changes, message", [
    ("augment", "views", {"augment": {"views": 0, "hflip": 0.3}}, {"augment": {"views": 2}}, "augment.views: 0 in the study, 2 in the YAML"),
    ("training", "early_stop_patience", {}, {"training": {"early_stop_patience": 2}},
     "training.early_stop_patience: null in the study, 2 in the YAML"),
])
def test_a_study_stored_before_a_key_existed_continues_unless_the_yaml_changes_what_its_trials_ran(
        study_run, tmp_path, capsys, section, key, keeps, changes, message):
    path, config, _ = study_run
    study = open_study(config, create=False)
    definition = study.user_attrs[DEFINITION_ATTR]
    assert key in definition[section]
    older = {**definition, section: {k: v for k, v in definition[section].items() if k != key}}  # as an older version stored it
    if section == "augment":
        del older[section]
    data = yaml.safe_load(path.read_text())
    data["budget"]["n_trials"] = 1  # already met: nothing trains
    for override, code in ((keeps, 0), (changes, 2)):
        study.set_user_attr(DEFINITION_ATTR, older)
        changed = tmp_path / "changed.yaml"
        changed.write_text(yaml.safe_dump({**data, **{s: {**data.get(s, {}), **v} for s, v in override.items()}}))
        assert run_study.main(["-q", "optimize", "--study", str(changed)]) == code, override
    assert message in capsys.readouterr().err
    study.set_user_attr(DEFINITION_ATTR, definition)


def test_a_study_stored_under_the_earlier_early_stop_count_is_not_continued_under_the_new_one(study_run, tmp_path, capsys):
    path, config, _ = study_run
    study = open_study(config, create=False)
    definition = study.user_attrs[DEFINITION_ATTR]
    earlier = {**definition, "training": {**definition["training"], "early_stop_patience": 2}}  # as stored before the rule changed
    data = yaml.safe_load(path.read_text())
    data["training"]["early_stop_patience"] = 2
    data["budget"]["n_trials"] = 1  # already met: nothing trains
    changed = tmp_path / "patience.yaml"
    changed.write_text(yaml.safe_dump(data))
    study.set_user_attr(DEFINITION_ATTR, earlier)
    try:
        assert run_study.main(["-q", "optimize", "--study", str(changed)]) == 2
        assert 'training.early_stop_rule: "unset" in the study, "degenerate epochs skipped" in the YAML' in capsys.readouterr().err
        study.set_user_attr(DEFINITION_ATTR, {**earlier, "training": {**earlier["training"], "early_stop_rule": "degenerate epochs skipped"}})
        assert run_study.main(["-q", "optimize", "--study", str(changed)]) == 0  # stored under the new rule
    finally:
        study.set_user_attr(DEFINITION_ATTR, definition)


def test_a_manifest_study_stored_before_image_sizes_were_identified_adopts_them_then_refuses_other_images():
    """data.image_sizes_sha256 came after studies were stored: such a study cannot tell which
    images its trials saw and takes the YAML's; from then on other images are refused."""
    import optuna

    from search.study import check_definition

    config = load_study_config(DEMO)  # names the study in messages
    definition = {"objectives": [["auc", "maximize"]], "data": {"manifest_sha256": "m", "attributes": {"gender": ["male"]}},
                  "training": {"early_stop_patience": None}, "augment": {"views": 0}}
    wanted = {**definition, "data": {**definition["data"], "image_sizes_sha256": "sizes-1"}}
    study = optuna.create_study(directions=["maximize"])
    study.add_trial(optuna.trial.create_trial(values=[0.7]))
    study.set_user_attr(DEFINITION_ATTR, definition)  # as stored before the key
    check_definition(study, config, wanted)
    assert study.user_attrs[DEFINITION_ATTR] == wanted
    other = {**definition, "data": {**definition["data"], "image_sizes_sha256": "sizes-2"}}
    with pytest.raises(ValueError, match=r'data.image_sizes_sha256: "sizes-1" in the study, "sizes-2" in the YAML'):
        check_definition(study, config, other)
    assert study.user_attrs[DEFINITION_ATTR] == wanted

@pytest.mark.parametrize("failed_trials", [0, 2])
def test_a_study_without_trials_or_with_failed_ones_only_takes_the_corrected_definition(tmp_path, failed_trials):
    """A first attempt that failed before any trial (in prepare, say), or whose every trial failed,
    may be corrected and rerun."""
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name="empty")
    config = load_study_config(path)
    study = open_study(config)
    for _ in range(failed_trials):
        study.tell(study.ask(), state=TrialState.FAIL)
    corrected = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, cache_dtype="float32"))
    study = open_study(corrected)
    assert study.user_attrs[DEFINITION_ATTR] == study_definition(corrected) != study_definition(config)


def test_a_model_that_does_not_fit_the_backbone_stops_before_the_cache_is_built(tmp_path, capsys):
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name="heads")
    data = yaml.safe_load(path.read_text())
    data["model"] = {**data.get("model", {}), "attn_heads": 7}
    path.write_text(yaml.safe_dump(data))
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 2
    assert "model.attn_heads: 7 does not divide the attention width" in capsys.readouterr().err
    assert not (tmp_path / "work" / "features").exists()



@pytest.mark.parametrize("key", ["workdir", "artifacts", "storage"])
def test_a_folder_the_study_writes_to_that_cannot_be_one_is_named_before_anything_is_prepared(tmp_path, capsys, key):
    """artifacts: pointing at a file failed after data, caches and Stage 1 (in the first trial's
    set-up), with a bare 'File exists' that named no key."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name="folders")
    data = yaml.safe_load(path.read_text())
    data[key] = {"workdir": str(blocker / "work"), "artifacts": str(blocker),
                 "storage": f"sqlite:///{blocker / 'study.db'}"}[key]
    path.write_text(yaml.safe_dump(data))
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}: cannot create the folder") and err.count("\n") == 1, err
    assert not (tmp_path / "work" / "features").exists() and not (tmp_path / "work" / "data").exists()
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["show", "export", "report", "evaluate"])
@pytest.mark.parametrize("section, key, value, named", [
    ("model", "stage2_hidden_ratio", 2.0, "model.stage2_hidden_ratio"),
    ("objectives", None, [{"metric": "auc"}, {"metric": "f_dp"}, {"metric": "f_fpr"}], "objectives"),
    ("training", "num_epochs", 5, "training.num_epochs"),
    # the inputs' settings: an export would train on other features, an evaluate regenerated the
    # study's synthetic data with another seed and replaced its stored results
    ("backbone", "stage2_layer", -3, "backbone.stage2_layer"),
    ("stage1", "epochs", 3, "stage1.epochs"),
    ("data", "synthetic.seed", 1, "data.synthetic.seed"),
])
def test_reading_a_study_with_a_yaml_that_changed_its_settings_is_refused(study_run, tmp_path, capsys, command, section, key, value, named):
    """An export would carry the YAML's model, not the one its trial ran with; a table would label
    F_FPR values with the YAML's f_dp."""
    path, _, _ = study_run
    data = yaml.safe_load(path.read_text())
    if key is None:
        data[section] = value
    else:
        *parents, leaf = key.split(".")
        where = data.setdefault(section, {})
        for parent in parents:
            where = where[parent]
        where[leaf] = value
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    workdir = Path(data["workdir"])
    stored_data = sorted(p.name for p in (workdir / "data").iterdir())
    extra = {"show": [], "export": ["--pick", "knee", "--out", str(out)], "report": ["--out", str(out)],
             "evaluate": ["--trials", "all"]}[command]
    assert run_study.main(["-q", command, "--study", str(changed), *extra]) == 2
    err = capsys.readouterr().err
    assert "was created with another definition" in err and named in err and "restore the YAML" in err
    assert not out.exists() and sorted(p.name for p in (workdir / "data").iterdir()) == stored_data


def test_run_settings_may_differ_between_invocations_of_one_study(study_run, tmp_path):
    path, config, study = study_run
    data = yaml.safe_load(path.read_text())
    data["training"].update(device="cpu", feature_mode="online")
    data["budget"]["n_trials"] = 1  # already met: nothing trains
    changed = tmp_path / "moved.yaml"
    changed.write_text(yaml.safe_dump(data))
    assert run_study.main(["-q", "optimize", "--study", str(changed)]) == 0


@pytest.mark.parametrize("record_as, state", [("infeasible", TrialState.COMPLETE), ("pruned", TrialState.PRUNED)])
def test_forced_degenerate_trials_are_stopped_recorded_and_never_exported(tmp_path, record_as, state):
    # lr 0 (and lr not searched): the head stays at the training prior, every prediction "fake".
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name=f"degenerate-{record_as}", n_trials=2,
                           stopping={"degenerate_after_epochs": 2, "record_degenerate_as": record_as})
    data = yaml.safe_load(path.read_text())
    data["training"]["lr"] = 0.0
    del data["search_space"]["lr"]
    data["sampler"]["name"] = "tpe" if record_as == "pruned" else "gp"
    path.write_text(yaml.safe_dump(data))
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 0
    study = open_study(load_study_config(path), create=False)
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == state for t in trials)
    for trial in trials:
        assert trial.user_attrs["degenerate"] is True
        assert trial.user_attrs["stopped_epoch"] == 2
        assert trial.user_attrs["stop_reason"].startswith("degenerate")
    assert study.best_trials == []
    with pytest.raises(PickError, match="no feasible complete trial"):
        pick_trial(study, "knee")
    with pytest.raises(PickError, match="infeasible|PRUNED"):
        pick_trial(study, f"trial:{trials[0].number}")


def test_a_trial_ended_by_early_stop_patience_is_feasible_and_its_export_stops_where_it_did(tmp_path, capsys):
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name="patience", n_trials=2, stopping={"degenerate_after_epochs": None},
                           search_space={"lr": {"low": 0.99e-3, "high": 1.01e-3, "log": True}})  # out of the one-class phase at epoch 5
    data = yaml.safe_load(path.read_text())
    data["training"].update(num_epochs=7, T_0=2, early_stop_patience=1)
    path.write_text(yaml.safe_dump(data))
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 0
    study = open_study(load_study_config(path), create=False)
    stopped = [t for t in study.get_trials() if t.user_attrs.get("stop_reason", "").startswith("early stop")]
    assert stopped, "the test needs a trial that stopped early"
    trial = stopped[0]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["degenerate"] is False
    assert trial.user_attrs["stopped_epoch"] == trial.user_attrs["epochs_run"] < 7
    assert pick_trial(study, f"trial:{trial.number}") == trial  # feasible: it may be picked and exported
    out = tmp_path / "stopped.yaml"
    assert run_study.main(["export", "--study", str(path), "--pick", f"trial:{trial.number}", "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["training"]["early_stop_patience"] == 1
    assert run_study.main(["-q", "train", "--config", str(out), "--output-dir", str(tmp_path / "retrain")]) == 0
    metrics = json.loads((tmp_path / "retrain" / "metrics.json").read_text())
    assert (metrics["status"], metrics["stop_reason"], metrics["epochs_run"]) == ("stopped", trial.user_attrs["stop_reason"], trial.user_attrs["epochs_run"])
    assert [metrics["val"][m] for m in ("auc", "f_meo", "f_fpr")] == trial.values


def test_a_trial_never_out_of_the_degenerate_phase_is_infeasible_without_a_stop_rule(tmp_path):
    # No stop rule, so the trial runs all 3 epochs, each one-class (F_MEO 0 at every epoch):
    # counted as feasible it would dominate every honest trial on fairness.
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name="degenerate-unstopped", n_trials=1,
                           stopping={"degenerate_after_epochs": None})
    data = yaml.safe_load(path.read_text())
    data["training"]["lr"] = 0.0
    del data["search_space"]["lr"]
    path.write_text(yaml.safe_dump(data))
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 0
    study = open_study(load_study_config(path), create=False)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["status"] == "completed"
    assert trial.user_attrs["epochs_run"] == 3 and "stop_reason" not in trial.user_attrs
    assert trial.user_attrs["degenerate"] is True and trial.user_attrs["val_f_meo"] == 0.0
    assert study.best_trials == []
    with pytest.raises(PickError, match=r"infeasible \(degenerate: every validation prediction one class in every epoch\)"):
        pick_trial(study, f"trial:{trial.number}")


def test_non_finite_loss_ends_the_trial_failed_and_the_study_goes_on(tmp_path, monkeypatch):
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name="nan", n_trials=1)
    import torch

    calls = {"n": 0}
    real = objectives.fairness_loss

    def sometimes_nan(scores, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 5:  # the first trial's first epoch
            return scores.sum() * torch.tensor(float("nan"))
        return real(scores, *args, **kwargs)

    monkeypatch.setattr(objectives, "fairness_loss", sometimes_nan)
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 0
    study = open_study(load_study_config(path), create=False)
    failed = study.get_trials(states=[TrialState.FAIL])
    assert len(failed) == 1 and "non-finite loss" in failed[0].user_attrs["fail_reason"]
    assert len(study.get_trials(states=[TrialState.COMPLETE])) == 1


def test_reading_a_study_from_a_missing_sqlite_file_creates_nothing(study_run, tmp_path, capsys):
    path, _, _ = study_run
    missing = tmp_path / "typo" / "study.db"
    for command in (["show"], ["export", "--out", str(tmp_path / "x.yaml")]):
        assert run_study.main([command[0], "--study", str(path), "--storage", f"sqlite:///{missing}", *command[1:]]) == 2
        assert f"no study database at {missing}" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_a_read_only_study_is_shown_exported_and_browsed_and_refuses_optimize_in_one_line(study_run, tmp_path, capsys, caplog):
    """A study copied read-only (SQLite's mode=ro here): optimize fails in one line before any
    work and stores nothing; export writes its file and says in one line why the dashboard copy
    is missing, leaving no orphan artifact file; the dashboard's notes are skipped, not fatal."""
    from search.dashboard import annotate_study

    path, config, study = study_run
    database = Path(yaml.safe_load(path.read_text())["workdir"]) / "study.db"
    read_only = ["--storage", f"sqlite:///file:{database}?mode=ro&uri=true"]
    stored, artifacts = database.read_bytes(), sorted(p.name for p in config.artifact_dir.iterdir())
    assert run_study.main(["-q", "show", "--study", str(path), *read_only]) == 0
    capsys.readouterr()
    assert run_study.main(["-q", "optimize", "--study", str(path), *read_only, "--n-trials", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the study storage sqlite:///file:") and "refuses writes" in err and err.count("\n") == 1
    out = tmp_path / "best.yaml"
    assert run_study.main(["-q", "export", "--study", str(path), *read_only, "--pick", "knee", "--out", str(out)]) == 0
    assert out.read_text().startswith("# fairfront export:")
    warned = [r for r in caplog.records if "is not attached" in r.getMessage()]
    assert len(warned) == 1 and warned[0].exc_info is None and "refuses writes" in warned[0].getMessage()
    caplog.clear()
    read_only_config = dataclasses.replace(config, storage=read_only[1])
    assert annotate_study(open_study(read_only_config, create=False), read_only_config, refresh=True) == 0
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "WARNING"] == ["dashboard notes not written"]
    assert database.read_bytes() == stored and sorted(p.name for p in config.artifact_dir.iterdir()) == artifacts


def test_a_study_gone_read_only_stops_optimize_and_evaluate_before_preparing(study_run, monkeypatch, capsys):
    """The same command line as the last run, so the remembered arguments need no write: the
    first write would come after preparation (optimize) or scoring (evaluate); a probe stops both first."""
    import search.evaluate
    import search.study
    from search.study_args import format_study_args, remember_study_args

    path, config, study = study_run
    database = Path(yaml.safe_load(path.read_text())["workdir"]) / "study.db"
    read_only = f"sqlite:///file:{database}?mode=ro&uri=true"
    remember_study_args(study, format_study_args(str(path), storage=read_only))
    stored = database.read_bytes()

    def no_preparation(*args, **kwargs):
        raise AssertionError("prepared data for a study whose results cannot be stored")

    monkeypatch.setattr(search.study, "prepare", no_preparation)
    monkeypatch.setattr(search.evaluate, "prepare", no_preparation)
    for command in (["optimize", "--n-trials", "1"], ["evaluate"]):
        assert run_study.main(["-q", command[0], "--study", str(path), "--storage", read_only, *command[1:]]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: the study storage sqlite:///file:") and "refuses writes" in err and err.count("\n") == 1
    assert database.read_bytes() == stored


def test_a_study_that_ends_short_of_its_budget_exits_1(tmp_path, monkeypatch, capsys):
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name="short", n_trials=2)
    data = yaml.safe_load(path.read_text())
    data["budget"]["max_failed_trials"] = 1
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(objectives, "fairness_loss", lambda scores, *a, **k: scores.sum() * float("nan"))
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 1
    assert "the study has 0 of its 2 finished trials" in capsys.readouterr().err


def test_a_machine_that_cannot_compile_stops_the_study_before_preparing_anything(tmp_path, monkeypatch, capsys):
    path = tiny_study_yaml(tmp_path / "work", tmp_path / "study.yaml", name="nocompile", n_trials=1)
    data = yaml.safe_load(path.read_text())
    data["training"]["compile_sinkhorn"] = True
    path.write_text(yaml.safe_dump(data))

    def broken(device):
        raise OSError("no C compiler found")

    from model import runtime

    monkeypatch.setattr(objectives, "compile_fairness_loss", broken)
    monkeypatch.setattr(runtime, "_compiled_for", set())  # as in a fresh process: earlier tests compiled for the CPU
    assert run_study.main(["-q", "optimize", "--study", str(path)]) == 2
    assert "training.compile_sinkhorn: torch.compile failed on cpu (OSError: no C compiler found)" in capsys.readouterr().err
    assert not (tmp_path / "work" / "data").exists()  # no synthetic data, cache or Stage 1 was built
    assert open_study(load_study_config(path), create=False).trials == []


def test_the_commands_a_trial_note_and_the_report_print_name_the_study_as_optimize_was_given_it(study_run, tmp_path, monkeypatch):
    """A study run with --storage and --study-name overrides: the note's export command, copied
    from the dashboard and run as it stands, must export that trial (it used to say
    `--study <study.yaml>` and could not name the storage)."""
    import shlex

    from search import dashboard
    from search.pareto import is_feasible
    from search.report import build_report

    path, _, _ = study_run
    storage, name = f"sqlite:///{tmp_path / 'elsewhere.db'}", "renamed study"
    assert run_study.main(["-q", "optimize", "--study", str(path), "--storage", storage, "--study-name", name, "--n-trials", "5"]) == 0
    config = load_study_config(path, storage=storage, study_name=name)
    study = open_study(config, create=False)
    trial = next(t for t in study.get_trials() if is_feasible(t))  # export refuses a degenerate trial
    note = dashboard.read_trial_note(study, trial)
    command = re.search(r"`(python run_study.py export [^`]+)`", note).group(1)
    argv = shlex.split(command)
    assert argv[argv.index("--storage") + 1] == storage and argv[argv.index("--study-name") + 1] == name
    monkeypatch.chdir(tmp_path)
    assert run_study.main(["-q", *argv[2:]]) == 0
    exported = yaml.safe_load((tmp_path / f"trial-{trial.number}.yaml").read_text())
    assert exported["training"]["lr"] == trial.params["lr"]

    markdown = build_report(study, config, tmp_path / "report").markdown.read_text()
    evaluate = re.search(r"`python run_study.py evaluate ([^`]+) --trials pareto`", markdown).group(1)
    assert shlex.split(evaluate) == argv[3:argv.index("--pick")]
