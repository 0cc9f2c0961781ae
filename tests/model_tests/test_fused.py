"""Fused training of K trials gives each trial what its serial run gives (model/fused.py).

Same seeds, batches, dropout masks, schedules, optimizer updates and stopping decisions; only
last-bit rounding of batched kernels differs, so float metrics are compared within 1e-5.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model.tokens as tokens
import objectives
from model import load_train_config, prepare, train
from model.config import ModelConfig
from model.detector import AdapterDetector
from model.fused import check_fusable, fusion_key, train_fused
from model.fused_detector import FusedDetector

from _run_patches import nan_gradient_at_call
from _tiny_run import tiny_train_data, write_train_yaml


# One trial per row: every searched key varies, plus the edge cases (no fairness term, no dropout,
# no clipping, a differential head lr). Blurs >= 1e-3 here: below that the float32 Sinkhorn gradient
# is ill-conditioned (see tests/objectives_tests/test_fairness_loss.py), so any change of
# rounding, fused or not, moves a run by more than 1e-5; small blurs are tested below through
# objectives.fairness_loss itself (fuse_fairness=False).
TRIALS = [
    dict(lr=3e-4, weight_decay=0.01, lambda_fair=0.15, sinkhorn_blur=1e-3, dropout=0.15, gate_init_bias=0.0, label_smoothing=0.1),
    dict(lr=1e-3, weight_decay=0.05, lambda_fair=0.9, sinkhorn_blur=3e-3, dropout=0.0, gate_init_bias=1.0, label_smoothing=0.0),
    dict(lr=5e-5, weight_decay=1e-4, lambda_fair=0.0, sinkhorn_blur=1e-4, dropout=0.3, gate_init_bias=-1.0, label_smoothing=0.05),
    dict(lr=1e-4, weight_decay=0.0, lambda_fair=0.4, sinkhorn_blur=1e-3, dropout=0.1, gate_init_bias=0.5, label_smoothing=0.2,
         grad_clip=None, head_lr_mult=2.0, sinkhorn_scaling=0.8),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    data = tiny_train_data(tmp, n_train=64, n_val=32, n_test=8, stage1_epochs=1,
                           training={"num_epochs": 3, "warmup_epochs": 1, "batch_size": 16, "T_0": 2})
    config = load_train_config(write_train_yaml(tmp, data))
    return config, prepare(config, progress=False, with_test_caches=False)


def configs_for(base_config, trials, root: Path):
    return [dataclasses.replace(base_config.with_training(**t), output_dir=root / f"trial-{i}") for i, t in enumerate(trials)]


TOLERANCE = 1e-5


def assert_same_runs(serial, fused):
    assert len(serial) == len(fused)
    for s, f in zip(serial, fused):
        assert (f.status, f.stop_reason, f.best_epoch, len(f.epochs)) == (s.status, s.stop_reason, s.best_epoch, len(s.epochs))
        for rs, rf in zip(s.epochs, f.epochs):
            row_s, row_f = rs.flat(), rf.flat()
            assert row_s.keys() == row_f.keys()
            for key in row_s:
                if key == "seconds":
                    continue
                if isinstance(row_s[key], float):
                    assert row_f[key] == pytest.approx(row_s[key], abs=TOLERANCE), (rs.epoch, key)
                else:
                    assert row_f[key] == row_s[key], (rs.epoch, key)
        best_s = torch.load(s.output_dir / "best.pt", weights_only=True)["state_dict"]
        best_f = torch.load(f.output_dir / "best.pt", weights_only=True)["state_dict"]
        assert best_s.keys() == best_f.keys()
        for key in best_s:
            if key == "fusion.k.bias":
                # Adds the same q.b to every key: the softmax cancels it, so its true gradient is 0
                # and Adam steps on rounding noise alone; serial and fused noise differ.
                continue
            torch.testing.assert_close(best_f[key], best_s[key], rtol=1e-4, atol=TOLERANCE, msg=key)


def test_fused_trials_equal_their_serial_runs(base, tmp_path):
    config, prepared = base
    configs = configs_for(config, TRIALS, tmp_path / "fused")
    fused = train_fused(configs, prepared, progress=False)
    serial = [train(dataclasses.replace(c, output_dir=tmp_path / "serial" / c.run_dir.name), prepared=prepared, progress=False)
              for c in configs]
    assert all(r.status == "completed" and len(r.epochs) == 3 for r in serial)
    assert_same_runs(serial, fused)
    # The trials really differ from each other (the comparison is not vacuous).
    assert len({r.epochs[-1].train_loss for r in fused}) == len(TRIALS)


def test_fused_trials_read_from_the_memory_map_equal_those_read_from_memory(base, tmp_path, monkeypatch):
    config, prepared = base
    held = train_fused(configs_for(config, TRIALS[:2], tmp_path / "held"), prepared, progress=False)
    monkeypatch.setattr(tokens, "PRELOAD_MAX_BYTES", 0)  # read ahead from the memory map
    unheld = dataclasses.replace(prepared, held_tokens=tokens.HeldTokens())  # not the sources earlier runs kept
    mapped = train_fused(configs_for(config, TRIALS[:2], tmp_path / "mapped"), unheld, progress=False)
    assert len(unheld.held_tokens) == 0
    for h, m in zip(held, mapped):
        assert [r.flat() | {"seconds": 0} for r in m.epochs] == [r.flat() | {"seconds": 0} for r in h.epochs]


def test_a_trial_stopped_early_leaves_the_group_and_the_others_are_unchanged(base, tmp_path):
    config, prepared = base
    trials = [TRIALS[0], dict(TRIALS[1], num_epochs=2), dict(TRIALS[2], lr=0.0, stop_if_degenerate_after=1), TRIALS[3]]
    configs = configs_for(config, trials, tmp_path / "fused")
    stop_second_epoch = lambda record: "callback says stop" if record.epoch == 2 else None  # noqa: E731
    callbacks = [None, None, None, stop_second_epoch]
    fused = train_fused(configs, prepared, callbacks=callbacks, progress=False)
    serial = [train(dataclasses.replace(c, output_dir=tmp_path / "serial" / c.run_dir.name), prepared=prepared, callback=cb, progress=False)
              for c, cb in zip(configs, callbacks)]
    assert [len(r.epochs) for r in fused] == [3, 2, 1, 2]
    assert fused[2].status == "stopped" and fused[2].stop_reason.startswith("degenerate")
    assert fused[3].stop_reason == "callback says stop"
    assert_same_runs(serial, fused)


def test_each_trial_keeps_its_own_early_stop_patience(base, tmp_path):
    config, prepared = base
    trials = [dict(TRIALS[1], lr=5e-3, early_stop_patience=1), dict(TRIALS[0], lr=5e-3, early_stop_patience=1),
              dict(TRIALS[1], lr=5e-3, early_stop_patience=2), dict(TRIALS[2], lr=5e-3, early_stop_patience=1)]
    configs = configs_for(config.with_training(num_epochs=6), trials, tmp_path / "fused")
    fused = train_fused(configs, prepared, progress=False)
    serial = [train(dataclasses.replace(c, output_dir=tmp_path / "serial" / c.run_dir.name), prepared=prepared, progress=False)
              for c in configs]
    assert_same_runs(serial, fused)
    assert [len(r.epochs) for r in fused] == [5, 4, 6, 6]  # (where each one's curve puts it: test_train_e2e's first_patience_stop)
    assert all(r.stop_reason.startswith("early stop") for r in fused[:2]) and fused[2].status == fused[3].status == "completed"


def test_each_trial_picks_its_best_epoch_among_its_non_degenerate_ones(base, tmp_path):
    config, prepared = base
    trials = [dict(TRIALS[0], lr=1e-2), dict(TRIALS[1], lr=3e-3)]  # each leaves the one-class phase once
    configs = configs_for(config, trials, tmp_path / "fused")
    fused = train_fused(configs, prepared, progress=False)
    serial = [train(dataclasses.replace(c, output_dir=tmp_path / "serial" / c.run_dir.name), prepared=prepared, progress=False)
              for c in configs]
    assert_same_runs(serial, fused)
    for result in fused:
        assert not result.best.degenerate
        # a degenerate epoch with a higher AUC was passed over: the rule mattered here
        assert any(r.degenerate and r.val["auc"] > result.best.val["auc"] for r in result.epochs)


def test_a_trial_whose_weights_become_non_finite_leaves_the_group_and_the_others_train_on(base, tmp_path, monkeypatch):
    config, prepared = base
    configs = configs_for(config, TRIALS, tmp_path / "fused")
    real, calls = objectives.fairness_loss_multi, []

    def poisoned(probabilities, *args, **kwargs):  # what nan_gradient_at_call does, to trial 0 alone
        calls.append(1)
        values = real(probabilities, *args, **kwargs)
        if len(calls) != 8:
            return values
        return values + F.one_hot(torch.tensor(0), len(values)) * torch.sqrt(probabilities[0] * 0).sum()

    monkeypatch.setattr(objectives, "fairness_loss_multi", poisoned)
    fused = train_fused(configs, prepared, progress=False)  # 64 rows / 16: call 8 is epoch 2's last step
    serial = [train(dataclasses.replace(c, output_dir=tmp_path / "serial" / c.run_dir.name), prepared=prepared, progress=False)
              for c in configs[1:]]
    nan_gradient_at_call(8, monkeypatch)
    serial.insert(0, train(dataclasses.replace(configs[0], output_dir=tmp_path / "serial" / "trial-0"), prepared=prepared, progress=False))
    assert fused[0].status == "diverged" and "non-finite validation scores" in fused[0].stop_reason
    assert [r.status for r in fused[1:]] == ["completed"] * 3
    assert_same_runs(serial, fused)


def test_each_trial_keeps_its_own_optimizer(base, tmp_path):
    config, prepared = base
    trials = [dict(TRIALS[0], optimizer="adam"), dict(TRIALS[1], optimizer="sgd", lr=0.05), dict(TRIALS[3], optimizer="radam")]
    configs = configs_for(config, trials, tmp_path / "fused")
    fused = train_fused(configs, prepared, progress=False)
    serial = [train(dataclasses.replace(c, output_dir=tmp_path / "serial" / c.run_dir.name), prepared=prepared, progress=False)
              for c in configs]
    assert_same_runs(serial, fused)


def test_small_blurs_through_the_per_trial_fairness_loss(base, tmp_path):
    config, prepared = base
    trials = [dict(TRIALS[0], sinkhorn_blur=1e-4), dict(TRIALS[1], sinkhorn_blur=2e-4, sinkhorn_scaling=0.95)]
    configs = configs_for(config, trials, tmp_path / "fused")
    fused = train_fused(configs, prepared, progress=False, fuse_fairness=False)
    serial = [train(dataclasses.replace(c, output_dir=tmp_path / "serial" / c.run_dir.name), prepared=prepared, progress=False)
              for c in configs]
    assert_same_runs(serial, fused)


def test_compiled_sinkhorn_changes_only_rounding_serial_and_fused(base, tmp_path):
    # training.compile_sinkhorn runs the same iterations through torch.compile: the runs match the
    # uncompiled ones within float32 rounding, and a compiled fused group matches its compiled
    # serial runs (the first call in this process compiles, ~20 s on 2 cores).
    config, prepared = base
    trials = [dict(t, compile_sinkhorn=True) for t in TRIALS[:2]]
    configs = configs_for(config, trials, tmp_path / "fused")
    fused = train_fused(configs, prepared, progress=False)
    compiled = [train(dataclasses.replace(c, output_dir=tmp_path / "compiled" / c.run_dir.name), prepared=prepared, progress=False)
                for c in configs]
    uncompiled = [train(dataclasses.replace(c.with_training(compile_sinkhorn=False), output_dir=tmp_path / "eager" / c.run_dir.name),
                        prepared=prepared, progress=False) for c in configs]
    assert_same_runs(compiled, fused)
    assert_same_runs(uncompiled, compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_trials_match_their_serial_runs_on_cuda_within_bf16_noise(base, tmp_path):
    # On CUDA both sides train under bf16 autocast, and a batched bf16 GEMM rounds differently
    # from K small ones, so the runs drift apart by bf16 noise rather than float32 rounding. The
    # tolerance was chosen ahead; the test passed on an H200 (2026-12-04, three device calls of
    # bench/device/gpu_session.sh), whose output does not say how close the runs came.
    config, prepared = base
    configs = [dataclasses.replace(c, training=dataclasses.replace(c.training, device="cuda"))
               for c in configs_for(config, TRIALS[:2], tmp_path / "fused")]
    fused = train_fused(configs, prepared, progress=False)
    serial = [train(dataclasses.replace(c, output_dir=tmp_path / "serial" / c.run_dir.name), prepared=prepared, progress=False)
              for c in configs]
    for s, f in zip(serial, fused):
        assert (f.status, len(f.epochs)) == (s.status, len(s.epochs))
        for rs, rf in zip(s.epochs, f.epochs):
            assert rf.train_loss == pytest.approx(rs.train_loss, rel=0.02), rs.epoch
            for metric in ("auc", "f_meo", "f_fpr"):
                assert rf.val[metric] == pytest.approx(rs.val[metric], abs=0.05), (rs.epoch, metric)


def test_fused_forward_matches_each_detector():
    width, k = 32, 3
    detectors = []
    for bias in (0.0, 1.0, -0.5)[:k]:
        torch.manual_seed(0)
        detectors.append(AdapterDetector(width, ModelConfig(), dropout=0.0, gate_init_bias=bias))
    for d in detectors[1:]:
        d.stage1.load_state_dict(detectors[0].stage1.state_dict())
        with torch.no_grad():  # make the trials differ everywhere, not only in the gate bias
            for p in d.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
    fused = FusedDetector(detectors).eval()
    cls, patches = torch.randn(5, width), torch.randn(5, 16, width)
    logits, gate = fused(cls, patches)
    for i, d in enumerate(detectors):
        out = d.eval()(cls, patches)
        torch.testing.assert_close(logits[i], out.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gate[i], out.gate, rtol=1e-5, atol=1e-6)


def test_trial_views_follow_the_stacked_weights_when_they_move_or_shrink():
    detectors = []
    for bias in (0.0, 1.0, 2.0):
        torch.manual_seed(0)
        detectors.append(AdapterDetector(16, ModelConfig(), dropout=0.0, gate_init_bias=bias))
    fused = FusedDetector(detectors)
    fused._apply(lambda t: t.clone())  # what .to(another device) does: new storage for every weight

    def shares_storage():
        return all(view.data_ptr() == fused.p(name)[k].data_ptr() for k in range(len(fused)) for name, view in fused.views(k).items())

    assert shares_storage()
    gate_bias = fused.views(2)["fusion.gate.bias"]
    fused.keep([0, 2])
    assert len(fused) == 2 and shares_storage()
    assert fused.views(1)["fusion.gate.bias"] is gate_bias and float(gate_bias.detach()) == 2.0
    with torch.no_grad():
        gate_bias.add_(1.0)  # an optimizer step on the view lands in the stacked weights
    assert fused.p("fusion.gate.bias")[1].detach().item() == 3.0


def test_configs_that_cannot_share_batches_are_refused(base, tmp_path):
    config, _ = base
    configs = configs_for(config, [{}, {"batch_size": 8}], tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        check_fusable(configs)
    with pytest.raises(ValueError, match="seed"):
        check_fusable(configs_for(config, [{}, {"seed": 1}], tmp_path))
    with pytest.raises(ValueError, match="compile_sinkhorn"):  # one pass runs the loop one way
        check_fusable(configs_for(config, [{}, {"compile_sinkhorn": True}], tmp_path))
    with pytest.raises(ValueError, match="output_dir"):
        check_fusable([configs[0], configs[0]])
    lr_only = configs_for(config, [{}, {"lr": 1e-3, "dropout": 0.0}], tmp_path)
    assert fusion_key(lr_only[0]) == fusion_key(lr_only[1]) != fusion_key(configs[1])
    check_fusable(lr_only)
