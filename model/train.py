"""One training run of the Stage 2 model. Knows nothing of Optuna.

``train(config)`` returns the run's history. Its stopping rules (``training.stop_if_degenerate_after``,
``training.early_stop_patience``) are the same in a search, which sets the first from the study's
``stopping`` section, and in a lone run. After every epoch it also hands an EpochRecord to an
optional ``callback``; one that returns a string stops the run with that reason (a hook for
callers of the library: ``search/`` needs none).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

import objectives
from model.augment import ViewPlan, source_batches
from model.config import TrainingConfig, TrainRunConfig, train_config_to_yaml_dict
from model.detector import AdapterDetector
from model.optim import build_optimizer, lr_factor, set_lr
from model.prepare import PreparedData, prepare
from model.runtime import autocast, compile_sinkhorn, make_folder, resolve_device, seed_everything
from model.tokens import OnlineTokens, TokenSource, read_batches

log = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    lr: float
    train_loss: float  # train_bce + train_fair, per-sample mean over the epoch
    train_bce: float  # label-smoothed BCE
    train_fair: float  # lambda_fair * the Sinkhorn fairness term: its part of the loss, not the term alone
    fair_share: float  # train_fair / train_loss
    val: dict[str, float]  # every metric of objectives.evaluate
    gate_mean: float
    gate_min: float
    gate_max: float
    degenerate: bool  # every validation prediction is one class
    seconds: float

    def flat(self) -> dict[str, float]:
        row = {k: v for k, v in asdict(self).items() if k != "val"}
        row.update({f"val_{k}": v for k, v in self.val.items()})
        return row


@dataclass
class TrainResult:
    status: Literal["completed", "stopped", "diverged"]
    stop_reason: str | None
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    output_dir: Path | None = None
    # validation groups (by name) without real / without fake samples: left out of the FPR / TPR
    # terms of F_FPR and F_MEO in every epoch (objectives.evaluate never counts them as rate 0)
    val_groups_without_real: list[str] = field(default_factory=list)
    val_groups_without_fake: list[str] = field(default_factory=list)

    @property
    def best(self) -> EpochRecord | None:
        return None if self.best_epoch is None else self.epochs[self.best_epoch - 1]

    @property
    def degenerate(self) -> bool:
        """No epoch of the run was anything but degenerate (its best epoch is one: see is_better_epoch)."""
        return self.best is not None and self.best.degenerate

    def summary(self) -> dict:
        """The deterministic summary written to metrics.json (no timings: reruns must match)."""
        best = self.best
        return {
            "status": self.status,
            "stop_reason": self.stop_reason,
            "epochs_run": len(self.epochs),
            "best_epoch": self.best_epoch,
            "val": None if best is None else best.val,
            "gate": None if best is None else {"mean": best.gate_mean, "min": best.gate_min, "max": best.gate_max},
            "fair_share": None if best is None else best.fair_share,
            "degenerate_epochs": [r.epoch for r in self.epochs if r.degenerate],
            "degenerate": self.degenerate,
            "val_groups_without_real": self.val_groups_without_real,
            "val_groups_without_fake": self.val_groups_without_fake,
        }


EpochCallback = Callable[[EpochRecord], "str | None"]


# Scoring a finished model (evaluate, score_cache) has no training batch size to scale.
SCORING_BATCH_SIZE = 256


def validation_batch_size(batch_size: int) -> int:
    """Validation keeps no activations for a backward pass: 4x the training batch fits alike."""
    return 4 * batch_size


def is_better_epoch(record: EpochRecord, best: EpochRecord | None) -> bool:
    """Whether ``record`` replaces ``best`` as the run's best epoch: the highest validation AUC
    among the epochs that are not degenerate. A degenerate epoch (every prediction one class) has
    every threshold-based fairness gap 0 whatever the model, so picking one by its AUC would give
    the trial perfect fairness it does not have; it is the best epoch only while no epoch of the
    run has been anything else, and the run then counts as degenerate."""
    if best is None:
        return True
    return (not record.degenerate, record.val["auc"]) > (not best.degenerate, best.val["auc"])


def groups_left_out(group_names: tuple[str, ...], labels: np.ndarray, groups: np.ndarray) -> tuple[list[str], list[str]]:
    """The validation groups, by name, that objectives.evaluate leaves out of the FPR terms (no real
    sample) and of the TPR terms (no fake sample) in every epoch; logged once."""
    evaluation = objectives.evaluate_detailed(labels, np.zeros(len(labels)), groups)  # which, does not depend on scores
    without_real, without_fake = ([group_names[g] for g in left] for left in (evaluation.groups_without_real, evaluation.groups_without_fake))
    for kind, rate, names in (("real", "FPR", without_real), ("fake", "TPR", without_fake)):
        if names:
            log.warning("validation groups without %s samples, left out of the %s terms of F_FPR/F_MEO: %s", kind, rate, ", ".join(names))
    return without_real, without_fake


def epoch_record(epoch: int, lr: float, losses: list[float], labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                 gates: np.ndarray, threshold: float, seconds: float) -> EpochRecord:
    """One epoch of a run: ``losses`` = [total, bce, lambda * fair] per sample, the validation
    metrics of ``scores``, the gate's range."""
    total, bce, fair = losses
    metrics = objectives.evaluate(labels, scores, groups, threshold=threshold)
    predicted = scores >= threshold
    return EpochRecord(
        epoch=epoch, lr=lr, train_loss=total, train_bce=bce, train_fair=fair, fair_share=fair / total if total > 0 else 0.0,
        val=metrics, gate_mean=float(gates.mean()), gate_min=float(gates.min()), gate_max=float(gates.max()),
        degenerate=bool(predicted.all() or not predicted.any()), seconds=seconds,
    )


def close_epoch(result: TrainResult, record: EpochRecord, callback: EpochCallback | None, cfg: TrainingConfig) -> bool:
    """Add ``record`` to the run: it becomes the best epoch when is_better_epoch says so, the
    callback sees it (every epoch, the last one too), and the run is "stopped" when a stopping rule
    of ``cfg`` or the callback gives a reason. Returns whether it is the new best epoch (the caller
    keeps its weights)."""
    improved = is_better_epoch(record, result.best)
    if improved:
        result.best_epoch = record.epoch
    result.epochs.append(record)
    asked = callback(record) if callback else None
    reason = degenerate_stop_reason(result.epochs, cfg.stop_if_degenerate_after) or patience_stop_reason(result, cfg) or asked
    if reason:
        result.status, result.stop_reason = "stopped", reason
    return improved


def non_finite_scores_reason(scores: np.ndarray, epoch: int) -> str | None:
    """A run whose weights became nan/inf although its loss stayed finite (a non-finite gradient
    in an epoch's last step reaches the weights without passing through a loss value)."""
    bad = int((~np.isfinite(scores)).sum())
    return f"non-finite validation scores (nan/inf) in epoch {epoch}: {bad} of {len(scores)}" if bad else None


def degenerate_stop_reason(epochs: list[EpochRecord], after: int | None) -> str | None:
    """Stop a run still in its degenerate phase (every prediction one class) after `after` epochs."""
    if after is not None and len(epochs) == after and all(r.degenerate for r in epochs):
        return f"degenerate: every validation prediction was one class in each of the first {after} epochs"
    return None


def patience_stop_reason(result: TrainResult, cfg: TrainingConfig) -> str | None:
    """Stop a run after ``cfg.early_stop_patience`` non-degenerate epochs since its best epoch that
    did not improve it. Degenerate epochs are skipped, neither counted nor resetting the count (they
    cannot be the best epoch, and stop_if_degenerate_after rules the degenerate phase); nor does the
    last epoch stop a run: there is nothing left to save, the run completed."""
    best, done, patience = result.best, len(result.epochs), cfg.early_stop_patience
    if patience is None or best is None or best.degenerate or done >= cfg.num_epochs:
        return None
    if sum(not r.degenerate for r in result.epochs if r.epoch > best.epoch) < patience:
        return None
    return f"early stop: validation AUC has not improved on epoch {best.epoch}'s {best.val['auc']:.4f} in {patience} non-degenerate epochs since"


def train(
    config: TrainRunConfig,
    *,
    prepared: PreparedData | None = None,
    callback: EpochCallback | None = None,
    progress: bool = True,
    write_outputs: bool = True,
) -> TrainResult:
    if write_outputs:
        make_run_dir(config)
    prepared = prepared or prepare(config, progress=progress, with_test_caches=False)
    cfg = config.training
    device = resolve_device(cfg.device)
    compile_sinkhorn(cfg.compile_sinkhorn and cfg.lambda_fair > 0, device)
    frame = prepared.manifest.frame
    train_rows, val_rows = (np.flatnonzero(frame["split"].to_numpy() == s) for s in ("train", "val"))
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.float32)
    groups = torch.tensor(frame["group"].to_numpy(), dtype=torch.long)
    train_source, val_source = training_source(prepared, config, train_rows, device), rows_source(prepared, val_rows, device, cfg.feature_mode)

    # Seeded after the sources: building one (a views cache made on first use) may draw from the
    # global RNG, and the run must not depend on whether a cache already existed. (fused.py's
    # groups seed at the same point.)
    seed_everything(cfg.seed)
    detector = AdapterDetector(
        prepared.backbone.shape.width, config.model, dropout=cfg.dropout, gate_init_bias=cfg.gate_init_bias,
        prior_fake=float(labels[train_rows].mean()),
    )
    detector.stage1.load_state_dict(prepared.stage1_state)
    detector.to(device)
    log.info("parameters: %s", ", ".join(f"{k} {v:,}" for k, v in detector.parameter_counts().items()))
    optimizer = build_optimizer(detector.trainable_groups(), cfg)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    y_train = labels[train_rows].to(device)
    # CPU copies for the fairness loss, which builds its (label, group) pairs on the CPU: reading
    # them from the device would wait for the GPU at every step.
    y_train_cpu, g_train_cpu = labels[train_rows], groups[train_rows]
    y_val, g_val = labels[val_rows].numpy(), groups[val_rows].numpy()
    steps = -(-len(train_rows) // cfg.batch_size)

    result = TrainResult(status="completed", stop_reason=None)
    result.val_groups_without_real, result.val_groups_without_fake = groups_left_out(prepared.manifest.group_names, y_val, g_val)
    best_state = None
    bar = tqdm(range(1, cfg.num_epochs + 1), desc="epochs", unit="epoch", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        detector.train()
        sums = torch.zeros(3, device=device)  # total, bce, lambda * fair; one host sync per epoch
        finite = torch.ones((), dtype=torch.bool, device=device)
        order = torch.randperm(len(train_rows), generator=shuffle).split(cfg.batch_size)
        items = source_batches(order, config.augment, cfg.seed, epoch, len(train_rows))
        for step, (tokens, batch) in enumerate(zip(read_batches(train_source, items), order)):
            set_lr(optimizer, lr_factor(epoch - 1 + step / steps, cfg))
            index = batch.to(device, non_blocking=True)  # no stream sync on CUDA
            y = y_train[index]
            with autocast(device):
                logits = detector(tokens.cls, tokens.patches).logits.float()
            target = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            bce = F.binary_cross_entropy_with_logits(logits, target)
            fair = cfg.lambda_fair * objectives.fairness_loss(
                torch.sigmoid(logits), y_train_cpu[batch], g_train_cpu[batch], blur=cfg.sinkhorn_blur, scaling=cfg.sinkhorn_scaling, min_group_size=cfg.fair_min_group_size,
                compiled=cfg.compile_sinkhorn,
            ) if cfg.lambda_fair > 0 else logits.sum() * 0
            loss = bce + fair
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in detector.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            sums += torch.stack([loss.detach(), bce.detach(), fair.detach()]) * len(batch)
            finite &= torch.isfinite(loss.detach())
        if not bool(finite):
            result.status, result.stop_reason = "diverged", f"non-finite loss (nan/inf) in epoch {epoch}"
            log.warning("run stopped: %s", result.stop_reason)
            break
        scores, gates = _predict(detector, val_source, validation_batch_size(cfg.batch_size), device)
        if reason := non_finite_scores_reason(scores, epoch):
            result.status, result.stop_reason = "diverged", reason
            log.warning("run stopped: %s", reason)
            break
        record = epoch_record(epoch, optimizer.param_groups[0]["lr"], (sums / len(train_rows)).tolist(), y_val, scores, g_val, gates,
                              cfg.threshold, time.perf_counter() - start)
        metrics = record.val
        bar.set_postfix(auc=f"{metrics['auc']:.3f}", f_meo=f"{metrics['f_meo']:.3f}", gate=f"{record.gate_mean:.2f}", degenerate=record.degenerate)
        log.info(
            "epoch %d/%d  loss %.4f (fair share %.1f%%)  val auc %.4f f_meo %.4f f_fpr %.4f  gate %.2f [%.2f, %.2f]%s  %.1fs",
            epoch, cfg.num_epochs, record.train_loss, 100 * record.fair_share, metrics["auc"], metrics["f_meo"], metrics["f_fpr"],
            record.gate_mean, record.gate_min, record.gate_max, "  DEGENERATE" if record.degenerate else "", record.seconds,
        )
        if close_epoch(result, record, callback, cfg):
            best_state = copy.deepcopy(detector.state_dict())
        if result.status == "stopped":
            log.info("run stopped after epoch %d: %s", epoch, result.stop_reason)
            break
    bar.close()
    if write_outputs:
        result.output_dir = write_run_outputs(config, result, best_state)
    return result


def rows_source(prepared: PreparedData, rows: np.ndarray, device: torch.device, feature_mode: str) -> TokenSource:
    """The tokens of manifest ``rows``: from the cache (held on the device when they fit), or online."""
    if feature_mode == "online":
        return OnlineTokens(prepared.backbone.module, list(prepared.manifest.frame["path"].iloc[rows]), device)
    return prepared.held_tokens.get(prepared.cache, rows, device)


def training_source(prepared: PreparedData, config: TrainRunConfig, rows: np.ndarray, device: torch.device) -> TokenSource:
    """The training split's tokens: item i is row i of the split or, with augmented views, item
    v * len(rows) + i is view v of row i (augment.view_rows; augment.source_batches picks them)."""
    augment, feature_mode = config.augment, config.training.feature_mode
    if not augment.views:
        return rows_source(prepared, rows, device, feature_mode)
    if augment.identity() != prepared.config.augment.identity():
        raise ValueError("augment: this run's settings differ from those its data was prepared with; prepare it again")
    if feature_mode == "online":  # the same views, made on the fly
        views = ViewPlan.of(augment, rows)
        return OnlineTokens(prepared.backbone.module, list(prepared.manifest.frame["path"].iloc[views.rows]), device, views)
    views = prepared.views_cache(device)
    return prepared.held_tokens.get(views, np.arange(len(views)), device)


@torch.no_grad()
def _predict(detector: AdapterDetector, source: TokenSource, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Scores (sigmoid) and gate values for every row of a source, in row order."""
    detector.eval()
    scores, gates = [], []
    for tokens in read_batches(source, eval_batches(len(source), batch_size)):
        with autocast(device):
            out = detector(tokens.cls, tokens.patches)
        scores.append(torch.sigmoid(out.logits.float()).cpu())
        gates.append(out.gate.float().cpu())
    return torch.cat(scores).numpy().astype(np.float64), torch.cat(gates).numpy()


def eval_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Row indices 0..n-1 in order, in near-equal batches of at most ``batch_size``."""
    return np.array_split(np.arange(n), max(1, -(-n // batch_size)))


def predict_scores(detector: AdapterDetector, source: TokenSource, *, device: torch.device,
                   batch_size: int = SCORING_BATCH_SIZE) -> np.ndarray:
    """Public scoring entry point (cross-dataset evaluation)."""
    return _predict(detector, source, batch_size, device)[0]


RUN_FILES = ("best.pt", "curve.csv", "metrics.json", "config.yaml")  # what write_run_outputs writes


def make_run_dir(config: TrainRunConfig) -> Path:
    """The run's output folder, made before the caches and epochs."""
    return make_folder(config.run_dir, "output_dir", "the run folder")


def earlier_run_files(config: TrainRunConfig) -> list[str]:
    """The files of an earlier run in this run's folder, which writing this run replaces."""
    return [name for name in RUN_FILES if (config.run_dir / name).exists()]


def write_run_outputs(config: TrainRunConfig, result: TrainResult, best_state: dict | None) -> Path:
    """curve.csv, metrics.json, config.yaml and best.pt in the run's folder (serial and fused runs alike)."""
    out = config.run_dir
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([r.flat() for r in result.epochs]).to_csv(out / "curve.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(result.summary(), indent=2, sort_keys=True))
    (out / "config.yaml").write_text(yaml.safe_dump(train_config_to_yaml_dict(config), sort_keys=False))
    if best_state is not None:
        torch.save({"state_dict": best_state, "epoch": result.best_epoch, "config": train_config_to_yaml_dict(config)}, out / "best.pt")
    else:  # an earlier run's checkpoint in the same folder would be taken for this run's
        (out / "best.pt").unlink(missing_ok=True)
    return out
