"""End to end through the real entry point on a reduced copy of the demo: prepare + train."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import model.tokens as tokens
import objectives
import run_study
from model import load_train_config, prepare, train
from model.train import EpochRecord, TrainResult, close_epoch

from _run_patches import nan_gradient_at_call, predict_one_class_in
from _tiny_run import DEMO_TRAIN, tiny_train_data, write_train_yaml



def tiny_config(tmp_path: Path, **training) -> Path:
    data = tiny_train_data(tmp_path, n_train=160, n_val=80, n_test=16, stage1_epochs=2,
                           training={"num_epochs": 3, "warmup_epochs": 1, "batch_size": 32} | training)
    return write_train_yaml(tmp_path, data)


def test_prepare_then_train_twice_gives_identical_metrics(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert run_study.main(["-q", "prepare", "--config", str(config)]) == 0
    assert "feature cache" in capsys.readouterr().out
    runs = []
    for name in ("first", "second"):
        assert run_study.main(["-q", "train", "--config", str(config), "--output-dir", str(tmp_path / name)]) == 0
        runs.append(tmp_path / name)
    first, second = ((run / "metrics.json").read_text() for run in runs)
    assert first == second
    metrics = json.loads(first)
    assert set(objectives.METRIC_NAMES) <= set(metrics["val"])
    assert metrics["epochs_run"] == 3 and metrics["status"] == "completed"
    assert {"mean", "min", "max"} == set(metrics["gate"])
    for run in runs:
        assert (run / "best.pt").is_file() and (run / "config.yaml").is_file()
    curve = (runs[0] / "curve.csv").read_text().splitlines()
    assert len(curve) == 4 and "val_f_meo" in curve[0] and "gate_mean" in curve[0] and "fair_share" in curve[0]
    # the written config is itself a valid training config
    assert load_train_config(runs[0] / "config.yaml").training.num_epochs == 3


def test_best_epoch_is_the_best_validation_auc_of_the_epochs_that_are_not_degenerate(tmp_path):
    config = load_train_config(tiny_config(tmp_path, num_epochs=4))
    result = train(config, progress=False)
    # (a degenerate epoch's fairness gaps are 0 whatever the model: never the best while another exists)
    candidates = [r for r in result.epochs if not r.degenerate] or result.epochs
    best = max(candidates, key=lambda r: r.val["auc"])
    assert result.best_epoch == best.epoch
    assert result.summary()["val"]["auc"] == best.val["auc"]


def test_online_mode_matches_the_cache_up_to_storage_precision(tmp_path, monkeypatch):
    config = load_train_config(tiny_config(tmp_path, num_epochs=2))
    config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, cache_dtype="float32"))
    prepared = prepare(config, progress=False, with_test_caches=False)
    cached = train(config, prepared=prepared, progress=False, write_outputs=False)
    images = []
    batch = tokens.OnlineTokens.batch
    monkeypatch.setattr(tokens.OnlineTokens, "batch", lambda self, indices: (images.append(len(indices)), batch(self, indices))[1])
    # the run's own feature_mode decides, not the one `prepared` was made with
    online = train(config.with_training(feature_mode="online"), prepared=prepared, progress=False, write_outputs=False)
    assert sum(images) == 2 * (160 + 80)  # every image through the backbone, every epoch
    for a, b in zip(cached.epochs, online.epochs):
        for metric in ("auc", "f_meo", "f_fpr"):
            assert a.val[metric] == pytest.approx(b.val[metric], abs=1e-4)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)


def test_runs_on_a_finished_cache_never_build_the_backbone(tmp_path):
    config = load_train_config(tiny_config(tmp_path, num_epochs=1, warmup_epochs=0))
    assert prepare(config, progress=False).backbone.built  # the first prepare builds the caches with it
    prepared = prepare(config, progress=False)  # as every worker's prepare does
    train(config, prepared=prepared, progress=False, write_outputs=False)
    assert not prepared.backbone.built
    train(config.with_training(feature_mode="online"), prepared=prepared, progress=False, write_outputs=False)
    assert prepared.backbone.built


def test_training_from_the_memory_map_equals_training_from_memory(tmp_path, monkeypatch):
    config = load_train_config(tiny_config(tmp_path, num_epochs=2))
    prepared = prepare(config, progress=False, with_test_caches=False)
    held = train(config, prepared=prepared, progress=False, write_outputs=False)
    monkeypatch.setattr(tokens, "PRELOAD_MAX_BYTES", 0)  # every split now reads the memory map, ahead
    reads = []
    read = tokens.CachedTokens.read
    monkeypatch.setattr(tokens.CachedTokens, "read", lambda self, indices: (reads.append(len(indices)), read(self, indices))[1])
    unheld = dataclasses.replace(prepared, held_tokens=tokens.HeldTokens())  # not the sources the first run kept
    mapped = train(config, prepared=unheld, progress=False, write_outputs=False)
    assert sum(reads) == 2 * (160 + 80)  # two epochs of training and validation rows, all from the map
    assert [r.flat() | {"seconds": 0} for r in mapped.epochs] == [r.flat() | {"seconds": 0} for r in held.epochs]


def test_a_later_run_reuses_the_tokens_an_earlier_one_preloaded(tmp_path, monkeypatch):
    config = load_train_config(tiny_config(tmp_path, num_epochs=1, warmup_epochs=0))
    prepared = prepare(config, progress=False, with_test_caches=False)
    copies = []
    copy_rows = tokens._copy_rows
    monkeypatch.setattr(tokens, "_copy_rows", lambda array, *args: (copies.append(len(array)), copy_rows(array, *args))[1])
    first = train(config, prepared=prepared, progress=False, write_outputs=False)
    assert len(copies) == 4 and len(prepared.held_tokens) == 2  # cls + patches of the train and val splits
    other = train(config.with_training(lr=1e-2, seed=1), prepared=prepared, progress=False, write_outputs=False)
    again = train(config, prepared=prepared, progress=False, write_outputs=False)
    assert len(copies) == 4  # nothing copied again
    assert other.epochs[0].train_loss != first.epochs[0].train_loss
    assert again.epochs[0].flat() | {"seconds": 0} == first.epochs[0].flat() | {"seconds": 0}  # as good as new
    monkeypatch.setattr(tokens, "PRELOAD_MAX_BYTES", 0)
    unheld = dataclasses.replace(prepared, held_tokens=tokens.HeldTokens())
    train(config, prepared=unheld, progress=False, write_outputs=False)
    assert len(unheld.held_tokens) == 0  # memory-mapped sources are not kept


def test_a_run_does_not_depend_on_whether_its_views_cache_was_built_before_it(tmp_path):
    path = tiny_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(data | {"augment": {"views": 2, "hflip": 0.5}}))
    config = load_train_config(path)
    prepared = prepare(config, progress=False, with_test_caches=False, with_views=False)
    built_by_the_run = train(config, prepared=prepared, progress=False, write_outputs=False)
    already_there = train(config, prepared=prepared, progress=False, write_outputs=False)
    assert [r.flat() | {"seconds": 0} for r in built_by_the_run.epochs] == [r.flat() | {"seconds": 0} for r in already_there.epochs]


def test_a_run_without_a_checkpoint_leaves_no_earlier_runs_checkpoint_in_its_folder(tmp_path):
    config = load_train_config(tiny_config(tmp_path, num_epochs=2))
    prepared = prepare(config, progress=False, with_test_caches=False)
    assert train(config, prepared=prepared, progress=False).best_epoch is not None
    assert (config.run_dir / "best.pt").is_file()
    diverged = train(config.with_training(lr=1e30, grad_clip=None), prepared=prepared, progress=False)
    assert (diverged.status, diverged.best_epoch) == ("diverged", None), diverged.stop_reason
    assert not (config.run_dir / "best.pt").exists()
    assert json.loads((config.run_dir / "metrics.json").read_text())["best_epoch"] is None


def test_zero_learning_rate_stays_degenerate_and_is_stopped(tmp_path):
    # The head starts at the training prior (80% fake): with lr 0 every prediction stays "fake".
    config = load_train_config(tiny_config(tmp_path, lr=0.0, num_epochs=6, stop_if_degenerate_after=2))
    seen = []
    result = train(config, progress=False, write_outputs=False, callback=lambda record: seen.append(record.epoch))
    assert seen == [1, 2]  # the callback sees the epoch the rule stops at, too
    assert result.status == "stopped"
    assert len(result.epochs) == 2
    assert result.stop_reason.startswith("degenerate")
    assert all(r.degenerate for r in result.epochs)


def first_patience_stop(records, patience, num_epochs):
    """Where an early stop with this patience ends a run, read off that run's full curve: the first
    epoch before the last that ends ``patience`` non-degenerate epochs (degenerate ones skipped)
    none better than the best non-degenerate AUC before them."""
    best, streak = None, 0
    for epoch, record in enumerate(records, 1):
        if record.degenerate:
            continue
        elif best is None or record.val["auc"] > best:
            best, streak = record.val["auc"], 0
        else:
            streak += 1
        if streak >= patience and epoch < num_epochs:
            return epoch
    return None


def test_early_stop_patience_ends_the_run_where_its_full_curve_says_and_changes_nothing_before(tmp_path):
    config = load_train_config(tiny_config(tmp_path, num_epochs=7, lr=1e-3, T_0=2))  # in and out of the degenerate phase
    prepared = prepare(config, progress=False, with_test_caches=False)
    full = train(config, prepared=prepared, progress=False, write_outputs=False)
    stops = {patience: first_patience_stop(full.epochs, patience, 7) for patience in (1, 2, 3)}
    assert stops[1] is not None, "the test needs an epoch that does not improve on the best"
    for patience, stop in stops.items():
        run = train(config.with_training(early_stop_patience=patience), prepared=prepared, progress=False, write_outputs=False)
        if stop is None:
            assert (run.status, run.stop_reason, len(run.epochs)) == ("completed", None, 7)
        else:
            assert (run.status, len(run.epochs)) == ("stopped", stop), patience
            assert run.stop_reason == (f"early stop: validation AUC has not improved on epoch {run.best_epoch}'s "
                                       f"{run.best.val['auc']:.4f} in {patience} non-degenerate epochs since")
        assert [r.flat() | {"seconds": 0} for r in run.epochs] == [r.flat() | {"seconds": 0} for r in full.epochs[:len(run.epochs)]]
        assert run.best_epoch == max((e for e, r in enumerate(run.epochs, 1) if not r.degenerate), key=lambda e: run.epochs[e - 1].val["auc"])


def test_early_stop_patience_does_not_count_the_degenerate_phase_nor_stop_the_last_epoch():
    config = load_train_config(DEMO_TRAIN).with_training(num_epochs=6, early_stop_patience=2, stop_if_degenerate_after=None)
    training = config.training

    def run(curve):  # (degenerate, auc) per epoch
        result = TrainResult(status="completed", stop_reason=None)
        for epoch, (degenerate, auc) in enumerate(curve, 1):
            record = EpochRecord(epoch=epoch, lr=1e-3, train_loss=0.5, train_bce=0.5, train_fair=0.0, fair_share=0.0, val={"auc": auc},
                                 gate_mean=0.5, gate_min=0.5, gate_max=0.5, degenerate=degenerate, seconds=0.0)
            close_epoch(result, record, None, training)
            if result.status == "stopped":
                break
        return len(result.epochs), result.status

    # degenerate epochs whose AUC falls do not count: the first real epoch (4) is the best, and
    # epoch 6, two past it, is the last one
    assert run([(True, 0.9), (True, 0.8), (True, 0.7), (False, 0.6), (False, 0.5), (False, 0.55)]) == (6, "completed")
    assert run([(True, 0.9), (False, 0.6), (False, 0.5), (False, 0.55), (False, 0.9), (False, 0.9)]) == (4, "stopped")
    assert run([(False, 0.7), (False, 0.8), (False, 0.75), (False, 0.85), (False, 0.8), (False, 0.8)]) == (6, "completed")
    assert run([(False, 0.7), (False, 0.8), (False, 0.75), (False, 0.8), (False, 0.9), (False, 0.9)]) == (4, "stopped")  # a tie is no improvement
    # a degenerate epoch after the best is skipped: it neither counts nor restarts the count, so a
    # run that keeps slipping back into one class still stops
    assert run([(False, 0.8), (False, 0.7), (True, 0.6), (False, 0.7), (False, 0.7), (False, 0.9)]) == (4, "stopped")
    assert run([(False, 0.8), (True, 0.5), (False, 0.7), (True, 0.5), (False, 0.7), (True, 0.5)]) == (5, "stopped")


def test_callback_can_stop_a_run(tmp_path):
    config = load_train_config(tiny_config(tmp_path, num_epochs=5))
    seen = []
    result = train(config, progress=False, write_outputs=False, callback=lambda r: seen.append(r.epoch) or ("enough" if r.epoch == 2 else None))
    assert seen == [1, 2] and result.status == "stopped" and result.stop_reason == "enough"


def test_non_finite_loss_stops_the_run_with_a_reason(tmp_path, monkeypatch):
    config = load_train_config(tiny_config(tmp_path))

    monkeypatch.setattr(objectives, "fairness_loss", lambda scores, *a, **k: scores.sum() * torch.tensor(float("nan")))
    result = train(config, progress=False, write_outputs=False)
    assert result.status == "diverged"
    assert "non-finite loss" in result.stop_reason
    assert result.best_epoch is None


def test_train_cli_refuses_a_bad_config_before_any_compute(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    data = yaml.safe_load(tiny_config(tmp_path).read_text())
    data["training"]["lamda_fair"] = 0.1
    path.write_text(yaml.safe_dump(data))
    assert run_study.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "lamda_fair" in err and str(path) in err
    assert not (tmp_path / "work").exists()  # nothing generated, nothing written



def test_train_cli_keeps_an_earlier_run_unless_told_to_overwrite_it(tmp_path, capsys):
    """A second run into a folder that holds a run's outputs is refused before any work (a run
    that then diverged deleted the earlier best.pt); --overwrite replaces them."""
    path = tiny_config(tmp_path)
    out = tmp_path / "run"
    assert run_study.main(["-q", "train", "--config", str(path), "--output-dir", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in ("best.pt", "metrics.json", "curve.csv", "config.yaml")}
    data = yaml.safe_load(path.read_text())
    data["training"]["lr"] = 1e30  # diverges in its first epoch
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert run_study.main(["-q", "train", "--config", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output_dir: {out} holds an earlier run's outputs (best.pt, curve.csv, metrics.json, config.yaml)")
    assert "--overwrite" in err and {name: (out / name).read_bytes() for name in before} == before
    assert run_study.main(["-q", "train", "--config", str(path), "--output-dir", str(out), "--overwrite"]) == 1  # diverged
    assert json.loads((out / "metrics.json").read_text())["status"] == "diverged" and not (out / "best.pt").exists()


def test_an_output_dir_that_cannot_be_a_folder_fails_before_any_compute(tmp_path, capsys):
    path = tiny_config(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_study.main(["-q", "train", "--config", str(path), "--output-dir", str(blocker / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"error: output_dir: cannot create the run folder {blocker / 'run'} (")
    assert not (tmp_path / "work").exists()  # no data generated, no cache built, no Stage 1 trained
    assert blocker.read_text() == "not a folder"


def test_train_cli_names_an_image_that_cannot_be_decoded_in_one_line(tmp_path, capsys):
    from model.prepare import data_paths

    path = tiny_config(tmp_path)
    manifest, _ = data_paths(load_train_config(path), progress=False)
    broken = manifest.parent / next(line.split(",")[0] for line in manifest.read_text().splitlines()[1:])
    broken.write_bytes(b"")
    assert run_study.main(["-q", "train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {manifest}: 1 image(s) that cannot be decoded: line 2 {broken} (") and err.count("\n") == 1


def test_the_best_epoch_is_the_best_auc_among_the_epochs_that_are_not_degenerate(tmp_path, monkeypatch):
    config = load_train_config(tiny_config(tmp_path, num_epochs=4, lr=3e-3))  # leaves the degenerate phase
    prepared = prepare(config, progress=False, with_test_caches=False)
    honest = train(config, prepared=prepared, progress=False, write_outputs=False)
    aucs = [r.val["auc"] for r in honest.epochs]
    squashed = int(np.argmax(aucs)) + 1  # the epoch AUC alone would pick, made one-class
    others = [e for e, r in enumerate(honest.epochs, 1) if e != squashed and not r.degenerate]
    assert others, "the test needs a non-degenerate epoch besides the best one"
    predict_one_class_in({squashed}, monkeypatch)
    result = train(config, prepared=prepared, progress=False, write_outputs=False)
    assert result.epochs[squashed - 1].degenerate and result.epochs[squashed - 1].val["f_meo"] == 0.0
    assert [r.val["auc"] for r in result.epochs] == pytest.approx(aucs)
    assert result.best_epoch == max(others, key=lambda e: aucs[e - 1])
    assert not result.degenerate and not result.summary()["degenerate"]


def test_a_run_never_out_of_its_degenerate_phase_is_degenerate_even_without_a_stop_rule(tmp_path, monkeypatch):
    config = load_train_config(tiny_config(tmp_path, num_epochs=3, stop_if_degenerate_after=None))
    predict_one_class_in({1, 2, 3}, monkeypatch)
    result = train(config, progress=False, write_outputs=False)
    assert result.status == "completed" and all(r.degenerate for r in result.epochs)
    assert result.degenerate and result.summary()["degenerate"]
    assert result.best_epoch == int(np.argmax([r.val["auc"] for r in result.epochs])) + 1  # still a checkpoint


def test_weights_made_non_finite_by_a_finite_loss_end_the_run_diverged(tmp_path, monkeypatch):
    config = load_train_config(tiny_config(tmp_path, num_epochs=3))  # 160 rows / 32: 5 steps an epoch
    nan_gradient_at_call(10, monkeypatch)  # the last step of epoch 2: no later loss sees the NaN
    result = train(config, progress=False, write_outputs=False)
    assert result.status == "diverged"
    assert result.stop_reason.startswith("non-finite validation scores (nan/inf) in epoch 2")
    assert len(result.epochs) == 1 and result.best_epoch == 1


def test_a_stage1_checkpoint_of_another_shape_is_refused_by_prepare_naming_both_keys(tmp_path):
    from model.stage1 import Stage1Error

    config = load_train_config(tiny_config(tmp_path))
    checkpoint = prepare(config, progress=False, with_test_caches=False).stage1_checkpoint
    other = dataclasses.replace(config, stage1=dataclasses.replace(config.stage1, checkpoint=checkpoint),
                                model=dataclasses.replace(config.model, stage1_hidden_ratio=2 * config.model.stage1_hidden_ratio))
    with pytest.raises(Stage1Error, match=r"stage1.checkpoint: .* has hidden size \d+ .* model.stage1_hidden_ratio 2 needs \d+"):
        prepare(other, progress=False, with_test_caches=False)
    same = dataclasses.replace(other, model=config.model)
    assert prepare(same, progress=False, with_test_caches=False).stage1_checkpoint == checkpoint



def test_a_stage1_checkpoint_with_flipped_bits_is_retrained_not_reused_and_a_given_one_is_refused(tmp_path, caplog):
    """torch.load checks no CRC: weights with flipped bits loaded as weights, and every new trial
    trained on another frozen Stage 1."""
    from model.stage1 import Stage1Error

    config = load_train_config(tiny_config(tmp_path))
    first = prepare(config, progress=False, with_test_caches=False)
    blob = torch.load(first.stage1_checkpoint, weights_only=True)
    weight = blob["state_dict"]["fc1.weight"]
    bits = weight.view(torch.int32)
    bits ^= 1 << 10  # one mantissa bit of every weight
    torch.save(blob, first.stage1_checkpoint)
    given = dataclasses.replace(config, stage1=dataclasses.replace(config.stage1, checkpoint=first.stage1_checkpoint))
    with pytest.raises(Stage1Error, match=r"stage1.checkpoint: .* is damaged: its weights do not match the checksum"):
        prepare(given, progress=False, with_test_caches=False)
    again = prepare(config, progress=False, with_test_caches=False)
    assert "stage 1 checkpoint rebuilt" in caplog.text and "is damaged" in caplog.text
    for name, tensor in first.stage1_state.items():
        assert torch.equal(again.stage1_state[name], tensor), name  # retrained the same, on the CPU

def test_a_stage1_checkpoint_that_is_no_torch_file_is_refused_before_any_feature_is_extracted(tmp_path):
    from model.stage1 import Stage1Error

    config = load_train_config(tiny_config(tmp_path))
    garbage = tmp_path / "stage1.pt"
    garbage.write_text("not a checkpoint\n")
    config = dataclasses.replace(config, stage1=dataclasses.replace(config.stage1, checkpoint=garbage))
    with pytest.raises(Stage1Error, match=r"stage1.checkpoint: cannot load .*stage1.pt as a torch checkpoint"):
        prepare(config, progress=False, with_test_caches=False)
    assert not (config.workdir / "features").exists()


def test_validation_groups_left_out_of_the_fairness_terms_are_named_in_the_result(tmp_path, caplog):
    path = tiny_config(tmp_path, num_epochs=1, warmup_epochs=0)
    data = yaml.safe_load(path.read_text())
    data["data"]["synthetic"]["n_val"] = 24  # 20% real: some groups get none
    path.write_text(yaml.safe_dump(data))
    config = load_train_config(path)
    prepared = prepare(config, progress=False, with_test_caches=False)
    with caplog.at_level("WARNING", logger="model.train"):
        result = train(config, prepared=prepared, progress=False, write_outputs=False)
    val = prepared.manifest.frame[prepared.manifest.frame["split"] == "val"]
    labels_seen = val.groupby("group_name")["label"].agg(set)
    without_real = sorted(g for g, seen in labels_seen.items() if 0 not in seen)
    assert without_real and sorted(result.val_groups_without_real) == without_real
    assert sorted(result.val_groups_without_fake) == sorted(g for g, seen in labels_seen.items() if 1 not in seen)
    assert result.summary()["val_groups_without_real"] == result.val_groups_without_real
    assert all(name in caplog.text for name in without_real)
    assert result.epochs[0].val["n_groups_fpr"] == result.epochs[0].val["n_groups"] - len(without_real)
