"""The training loss, checked against an independent computation (DESIGN.md, "The model").

    loss = BCE(logits, y * (1 - ls) + ls / 2) + lambda_fair * fairness_loss(sigmoid(logits), y, group)

and the epoch records built from it: ``train_bce`` (per-sample mean of the BCE), ``train_fair``
(lambda_fair times the fairness term), ``train_loss`` (their sum) and ``fair_share``
(``train_fair / train_loss``). The other tests compare a run with itself (reruns, fused vs serial,
cache vs online), so a change of the definition made in model/train.py and model/fused.py alike
(dropping the ``ls / 2`` offset, or the lambda multiplier) left them all green; these do not.

How the independent computation is made exact on the CPU:

* ``objectives.fairness_loss`` (``fairness_loss_multi`` in a fused group) is replaced by a known
  constant that still hangs off the scores in the autograd graph (``scores.sum() * 0 + c``), and
  records what it was given;
* lr 0 (with warmup 0): every update of AdamW is then a multiple of lr, and its decoupled weight
  decay multiplies by ``1 - lr * weight_decay`` = 1, so the weights the run saves in best.pt are
  the ones its training step saw; dropout 0, no augmentation, no autocast on the CPU;
* the logits are recomputed from best.pt (``model.scoring.load_detector``) on the training rows'
  tokens read straight from the feature cache, and the BCE from them in float64 numpy as
  ``softplus(z) - t * z``.

If lr 0 did move the weights, the recorded scores (before the step) would not be the recomputed
ones (after it) and the fairness-input check would say so: the set-up checks itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import objectives
from model import load_train_config, prepare, train
from model.fused import train_fused
from model.scoring import load_detector

from _tiny_run import tiny_train_data, write_train_yaml

N_TRAIN = 64

# The stand-in fairness term's value, told apart per trial by the blur the trial passes to it.
FAIR_BY_BLUR = {1e-3: 0.25, 2e-3: 0.4}

FROZEN = dict(lr=0.0, warmup_epochs=0, weight_decay=0.05, dropout=0.0, num_epochs=1, batch_size=N_TRAIN, device="cpu",
              compile_sinkhorn=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loss")
    data = tiny_train_data(tmp, n_train=N_TRAIN, n_val=32, n_test=8, stage1_epochs=1, training=FROZEN)
    data.pop("augment", None)
    config = load_train_config(write_train_yaml(tmp, data))
    assert not config.augment.views
    return config, prepare(config, progress=False, with_test_caches=False)


class FairnessRecorder:
    """Stands in for objectives.fairness_loss / fairness_loss_multi: a constant per trial (by blur),
    in the graph of the scores, and a record of every call's inputs."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def single(self, scores, labels, groups, *, blur, scaling=0.9, min_group_size=2, compiled=False):
        self.calls.append(dict(scores=scores.detach().clone(), labels=labels.clone(), groups=groups.clone(), blurs=[blur],
                               scaling=scaling, min_group_size=min_group_size))
        return scores.sum() * 0 + FAIR_BY_BLUR[blur]

    def multi(self, scores, labels, groups, *, blurs, scalings, min_group_size=2, compiled=False):
        self.calls.append(dict(scores=scores.detach().clone(), labels=labels.clone(), groups=groups.clone(), blurs=list(blurs),
                               scaling=list(scalings), min_group_size=min_group_size))
        return scores.sum(1) * 0 + torch.tensor([FAIR_BY_BLUR[b] for b in blurs])


@pytest.fixture
def recorder(monkeypatch):
    fake = FairnessRecorder()
    # model/train.py and model/fused.py look both up on the objectives module at call time
    monkeypatch.setattr(objectives, "fairness_loss", fake.single)
    monkeypatch.setattr(objectives, "fairness_loss_multi", fake.multi)
    return fake


def training_rows(prepared):
    frame = prepared.manifest.frame
    rows = np.flatnonzero(frame["split"].to_numpy() == "train")
    return rows, frame["label"].to_numpy()[rows].astype(np.float64), frame["group"].to_numpy()[rows]


@torch.no_grad()
def recomputed_logits(checkpoint: Path, prepared) -> np.ndarray:
    """The saved detector's logits on every training row (row order), tokens read from the cache."""
    rows, _, _ = training_rows(prepared)
    detector = load_detector(checkpoint)
    cls = torch.from_numpy(np.asarray(prepared.cache.cls[rows])).float()
    patches = torch.from_numpy(np.asarray(prepared.cache.patches[rows])).float()
    return detector(cls, patches).logits.double().numpy()


def bce(logits: np.ndarray, target: np.ndarray) -> float:
    """Mean binary cross-entropy of logits against (soft) targets, in float64: softplus(z) - t * z."""
    return float(np.mean(np.logaddexp(0.0, logits) - target * logits))


def smoothed_bce(logits: np.ndarray, labels: np.ndarray, smoothing: float) -> float:
    """The BCE with label smoothing: targets y * (1 - ls) + ls / 2 (0.95 / 0.05 at ls 0.1)."""
    return bce(logits, labels * (1 - smoothing) + smoothing / 2)


def assert_epoch_losses(record, *, bce: float, lambda_fair: float, fair: float):
    assert record.train_bce == pytest.approx(bce, rel=1e-5, abs=1e-6)
    assert record.train_fair == pytest.approx(lambda_fair * fair, rel=1e-6, abs=1e-7)
    assert record.train_loss == pytest.approx(bce + lambda_fair * fair, rel=1e-5, abs=1e-6)
    assert record.fair_share == pytest.approx(lambda_fair * fair / (bce + lambda_fair * fair), rel=1e-5)


MATCH_ATOL = 1e-6


def assert_fairness_inputs(calls: list[dict], logits: np.ndarray, prepared, *, trial: int = 0, blur: float):
    """Over an epoch's calls, the fairness term saw sigmoid of each training row's logit exactly once,
    with that row's label and group (matched by score: the batches are shuffled)."""
    _, labels, groups = training_rows(prepared)
    expected = 1 / (1 + np.exp(-logits))
    gaps = np.diff(np.sort(expected))
    # float32 rounding puts a recorded score within ~1e-7 of its row's; the closest two rows are ~3e-5 apart
    assert gaps.min() > 2 * MATCH_ATOL, "scores too close to match the recorded ones to their rows"
    seen = []
    for call in calls:
        scores = call["scores"].double().numpy()
        scores = scores[trial] if scores.ndim == 2 else scores
        assert call["blurs"][trial] == blur
        nearest = np.abs(scores[:, None] - expected[None, :]).argmin(1)
        np.testing.assert_allclose(scores, expected[nearest], rtol=0, atol=MATCH_ATOL)
        np.testing.assert_array_equal(call["labels"].numpy(), labels[nearest])
        np.testing.assert_array_equal(call["groups"].numpy(), groups[nearest])
        seen.extend(nearest.tolist())
    assert sorted(seen) == list(range(len(labels)))  # every training row once


# 64 rows: one step of 64, or two unequal steps (48 + 16) that the epoch mean must weight by size
@pytest.mark.parametrize("batch_size", [N_TRAIN, 48])
def test_serial_run_loss_is_smoothed_bce_plus_lambda_times_fairness(base, recorder, tmp_path, batch_size):
    config, prepared = base
    ls, lam, blur = 0.1, 0.3, 1e-3
    config = dataclasses.replace(config.with_training(label_smoothing=ls, lambda_fair=lam, sinkhorn_blur=blur, batch_size=batch_size),
                                 output_dir=tmp_path / "run")
    result = train(config, prepared=prepared, progress=False)
    assert (result.status, len(result.epochs), result.best_epoch) == ("completed", 1, 1)
    assert len(recorder.calls) == -(-N_TRAIN // batch_size)

    logits = recomputed_logits(result.output_dir / "best.pt", prepared)
    _, labels, _ = training_rows(prepared)
    assert_fairness_inputs(recorder.calls, logits, prepared, blur=blur)
    assert all(c["min_group_size"] == config.training.fair_min_group_size for c in recorder.calls)
    record = result.epochs[0]
    assert record.lr == 0.0
    assert_epoch_losses(record, bce=smoothed_bce(logits, labels, ls), lambda_fair=lam, fair=FAIR_BY_BLUR[blur])
    # not vacuous: the targets without the ls / 2 offset, or without smoothing, give another BCE here
    assert abs(record.train_bce - bce(logits, labels * (1 - ls) + ls)) > 1e-3
    assert abs(record.train_bce - bce(logits, labels)) > 1e-3


def test_serial_run_without_fairness_term_is_the_smoothed_bce(base, recorder, tmp_path):
    config, prepared = base
    ls = 0.2
    config = dataclasses.replace(config.with_training(label_smoothing=ls, lambda_fair=0.0), output_dir=tmp_path / "run")
    result = train(config, prepared=prepared, progress=False)
    assert recorder.calls == []  # lambda_fair 0: the term is not computed at all
    _, labels, _ = training_rows(prepared)
    logits = recomputed_logits(result.output_dir / "best.pt", prepared)
    assert_epoch_losses(result.epochs[0], bce=smoothed_bce(logits, labels, ls), lambda_fair=0.0, fair=0.0)
    assert result.epochs[0].fair_share == 0.0


# Two trials differing in label_smoothing, lambda_fair and blur (which picks the stand-in's value).
FUSED_TRIALS = [
    dict(label_smoothing=0.1, lambda_fair=0.3, sinkhorn_blur=1e-3),
    dict(label_smoothing=0.2, lambda_fair=0.7, sinkhorn_blur=2e-3),
]


@pytest.mark.parametrize("fuse_fairness", [True, False], ids=["fairness_loss_multi", "fairness_loss"])
def test_fused_trials_loss_is_smoothed_bce_plus_lambda_times_fairness(base, recorder, tmp_path, fuse_fairness):
    config, prepared = base
    configs = [dataclasses.replace(config.with_training(**t), output_dir=tmp_path / f"trial-{k}") for k, t in enumerate(FUSED_TRIALS)]
    results = train_fused(configs, prepared, progress=False, fuse_fairness=fuse_fairness)
    assert len(recorder.calls) == (1 if fuse_fairness else 2)
    _, labels, _ = training_rows(prepared)
    for k, (trial, result) in enumerate(zip(FUSED_TRIALS, results)):
        assert (result.status, len(result.epochs), result.best_epoch) == ("completed", 1, 1)
        logits = recomputed_logits(result.output_dir / "best.pt", prepared)
        calls = recorder.calls if fuse_fairness else [recorder.calls[k]]
        assert_fairness_inputs(calls, logits, prepared, trial=k if fuse_fairness else 0, blur=trial["sinkhorn_blur"])
        fair = FAIR_BY_BLUR[trial["sinkhorn_blur"]]
        assert_epoch_losses(result.epochs[0], bce=smoothed_bce(logits, labels, trial["label_smoothing"]),
                            lambda_fair=trial["lambda_fair"], fair=fair)
    assert results[0].epochs[0].train_loss != pytest.approx(results[1].epochs[0].train_loss, rel=1e-3)  # the trials differ
