"""K training runs of the Stage 2 model in one fused pass over the same cached batches.

Horizontal fusion in the style of HFTA: the K trials of a group read the same batches (same
``batch_size`` and shuffle ``seed``), so the frozen tokens are gathered once, the frozen Stage 1
adapter runs once, and every trainable layer runs as one batched kernel over a leading trial
dimension (``baddbmm`` on ``[K, ...]``-stacked weights) instead of K small ones. Each trial keeps
its own hyperparameters (lr, weight_decay, lambda_fair, sinkhorn_blur, dropout, gate_init_bias,
label_smoothing, schedule, ...), its own optimizer state, its own dropout random stream and its own
stopping rule; a trial that stops or diverges leaves the group and the rest go on.

The same computation as ``model.train.train`` run K times, one after the other:

* the weights of trial k start from the same seeded initialisation as the serial run;
* optimizer and gradient clipping are torch's own, run per trial on views into the stacked
  weights (so every optimizer ``model/optim.py`` can build works, with the serial update);
* dropout draws its mask from trial k's own copy of the global random state, in the serial order,
  so trial k sees exactly the serial run's masks;
* the fairness loss of all trials goes through one packed Sinkhorn loop in which each trial
  follows its own epsilon schedule (``objectives.fairness_loss_multi``; ``fuse_fairness=False``
  calls ``objectives.fairness_loss`` per trial instead, which is exactly the serial run's call).

Only floating-point rounding differs: a batched kernel may round differently from K small ones
(CPU bmm takes another path than addmm for small matrices, a LayerNorm with a per-trial affine is
two ops instead of one fused kernel, and vectorised exp/erf differ from their scalar tails in the
last bit when tensor sizes differ), and training carries that noise along. Per-epoch metrics of
fused and serial runs agree within 1e-5 on the CPU (tests/model_tests/test_fused.py), and within
bf16 noise on CUDA, as long as the fairness gradient is well conditioned: below sinkhorn_blur
~1e-3 the float32 Sinkhorn gradient itself is not (geomloss' own gradient moves by 2% at blur 1e-4
and 50% at 1e-5 when the scores move by 1e-7), so any change of rounding (fusion, thread count,
another CPU or GPU) moves such runs by more; serial runs at 1 and 2 threads differ as much.

The K-trial module is model/fused_detector.py. Knows nothing of Optuna: ``search/`` (or ``bench/``)
groups trials and calls :func:`train_fused`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import objectives
from model.augment import source_batches
from model.config import TrainRunConfig
from model.detector import AdapterDetector
from model.fused_detector import FusedDetector
from model.optim import build_optimizer, lr_factor, set_lr
from model.prepare import PreparedData, prepare
from model.runtime import autocast, compile_sinkhorn, resolve_device, seed_everything
from model.tokens import read_batches
from model.train import (
    EpochCallback, TrainResult, close_epoch, epoch_record, eval_batches, groups_left_out, non_finite_scores_reason, rows_source,
    make_run_dir, training_source, validation_batch_size, write_run_outputs,
)

log = logging.getLogger(__name__)

__all__ = ["check_fusable", "fusion_key", "train_fused"]

# Training keys that must be equal inside a group: they decide the batches every trial reads, or
# how the group's one pass runs.
_SHARED_TRAINING_KEYS = ("batch_size", "seed", "device", "feature_mode", "compile_sinkhorn")
# Config sections that must be equal: the group reads one cache and builds one model shape.
_SHARED_SECTIONS = ("workdir", "data", "backbone", "model", "stage1")


def fusion_key(config: TrainRunConfig) -> str:
    """Trials with equal keys can be trained in one fused group (a hashable description)."""
    t = config.training
    return repr((*(getattr(config, s) for s in _SHARED_SECTIONS), config.augment.identity(),
                 *(getattr(t, k) for k in _SHARED_TRAINING_KEYS)))


def check_fusable(configs: Sequence[TrainRunConfig]) -> None:
    """Raise ValueError naming the first key on which ``configs`` cannot share one fused pass."""
    if not configs:
        raise ValueError("train_fused: give at least one config")
    first = configs[0]
    for i, c in enumerate(configs[1:], start=1):
        if c.augment.identity() != first.augment.identity():
            raise ValueError(f"train_fused: config {i} differs from config 0 in 'augment'; fused trials read the same views")
        for section in _SHARED_SECTIONS:
            if getattr(c, section) != getattr(first, section):
                raise ValueError(f"train_fused: config {i} differs from config 0 in '{section}'; fused trials share data and model shape")
        for key in _SHARED_TRAINING_KEYS:
            if getattr(c.training, key) != getattr(first.training, key):
                raise ValueError(
                    f"train_fused: config {i} has training.{key}={getattr(c.training, key)!r}, config 0 has "
                    f"{getattr(first.training, key)!r}; fused trials must read the same batches (group them by it)"
                )
    dirs = [c.run_dir for c in configs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("train_fused: two configs write to the same output_dir")


# ---- the fused training loop -------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Trial:
    config: TrainRunConfig
    callback: EpochCallback | None
    optimizer: torch.optim.Optimizer
    rng: torch.Tensor  # this trial's copy of the global CPU random state (dropout on the CPU)
    cuda_rng: torch.Tensor | None  # and of the CUDA one (dropout on CUDA)
    result: TrainResult = dataclasses.field(default_factory=lambda: TrainResult(status="completed", stop_reason=None))
    best_state: dict | None = None

    @property
    def cfg(self):
        return self.config.training


def _dropout(trials: list[_Trial], probabilities: list[float], device: torch.device):
    """Each trial's dropout on its slice, drawn from its own random stream in the serial order."""

    def apply(fused: torch.Tensor) -> torch.Tensor:
        out = []
        cpu_state = torch.get_rng_state()
        for k, (trial, p) in enumerate(zip(trials, probabilities)):
            if p == 0:
                out.append(fused[k])
                continue
            torch.set_rng_state(trial.rng)
            if trial.cuda_rng is not None:
                torch.cuda.set_rng_state(trial.cuda_rng, device)
            out.append(F.dropout(fused[k], p, training=True))
            trial.rng = torch.get_rng_state()
            if trial.cuda_rng is not None:
                trial.cuda_rng = torch.cuda.get_rng_state(device)
        torch.set_rng_state(cpu_state)
        return torch.stack(out)

    return apply


def _new_detector(config: TrainRunConfig, prepared: PreparedData, prior_fake: float) -> AdapterDetector:
    """The serial run's untrained detector (model/train.py builds it the same way)."""
    cfg = config.training
    detector = AdapterDetector(
        prepared.backbone.shape.width, config.model, dropout=cfg.dropout, gate_init_bias=cfg.gate_init_bias, prior_fake=prior_fake,
    )
    detector.stage1.load_state_dict(prepared.stage1_state)
    return detector


def _start_group(configs: list[TrainRunConfig], callbacks: list[EpochCallback | None], prepared: PreparedData, prior_fake: float,
                 device: torch.device) -> tuple[FusedDetector, list[_Trial]]:
    """The serial runs' initialisations (seeded one trial after the other), stacked, each trial
    with its optimizer and its copy of the random state that follows its initialisation."""
    detectors, rng_states, cuda_states = [], [], []
    for config in configs:
        seed_everything(config.training.seed)
        detectors.append(_new_detector(config, prepared, prior_fake))
        rng_states.append(torch.get_rng_state())
        cuda_states.append(torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    model = FusedDetector(detectors).to(device)
    log.info("fused group of %d trials, %s parameters each", len(configs), f"{sum(p[0].numel() for p in model.stacked.values()):,}")
    trials = [_Trial(config, callbacks[k], build_optimizer(model.trainable_groups(k), config.training), rng_states[k], cuda_states[k])
              for k, config in enumerate(configs)]
    return model, trials


def _fair_groups(trials: list[_Trial], device: torch.device) -> list[tuple[int, list[int], torch.Tensor]]:
    """(min_group_size, the trials with lambda_fair > 0 that use it, their indices on the device):
    one fairness-loss call per entry and step."""
    fair_trials = [k for k, t in enumerate(trials) if t.cfg.lambda_fair > 0]
    groups = []
    for size in sorted({trials[k].cfg.fair_min_group_size for k in fair_trials}):
        members = [k for k in fair_trials if trials[k].cfg.fair_min_group_size == size]
        groups.append((size, members, torch.tensor(members).to(device, non_blocking=True)))
    return groups


def _fair_loss(logits: torch.Tensor, y_cpu: torch.Tensor, g_cpu: torch.Tensor, trials: list[_Trial], fair_groups, lambdas: torch.Tensor,
               *, fuse: bool, compiled: bool) -> torch.Tensor:
    """lambda_fair * fairness loss per trial, [K]; 0 (in the graph) for a trial without the term,
    as the serial run adds it."""
    fair = logits.sum(1) * 0
    if not fair_groups:
        return fair
    probabilities = torch.sigmoid(logits)
    for size, members, index in fair_groups:
        blurs, scalings = [trials[k].cfg.sinkhorn_blur for k in members], [trials[k].cfg.sinkhorn_scaling for k in members]
        if fuse:
            values = objectives.fairness_loss_multi(probabilities[index], y_cpu, g_cpu, blurs=blurs, scalings=scalings,
                                                    min_group_size=size, compiled=compiled)
        else:  # exactly the serial run's call, per trial
            values = torch.stack([objectives.fairness_loss(probabilities[k], y_cpu, g_cpu, blur=blur, scaling=scaling,
                                                           min_group_size=size, compiled=compiled)
                                  for k, blur, scaling in zip(members, blurs, scalings)])
        fair = fair.index_put((index,), lambdas[index] * values)
    return fair


@torch.no_grad()
def _predict_fused(model: FusedDetector, source, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Scores [K, N] (float64) and gates [K, N] of every row of a source, in row order."""
    model.eval()
    scores, gates = [], []
    for tokens in read_batches(source, eval_batches(len(source), batch_size)):
        with autocast(device):
            logits, gate = model(tokens.cls, tokens.patches)
        scores.append(torch.sigmoid(logits.float()).cpu())
        gates.append(gate.float().cpu())
    return torch.cat(scores, dim=1).numpy().astype(np.float64), torch.cat(gates, dim=1).numpy()


def train_fused(
    configs: Sequence[TrainRunConfig],
    prepared: PreparedData | None = None,
    *,
    callbacks: Sequence[EpochCallback | None] | None = None,
    progress: bool = True,
    write_outputs: bool = True,
    fuse_fairness: bool = True,
) -> list[TrainResult]:
    """Train ``configs`` as one fused group; result k is what ``train(configs[k])`` returns.

    The configs must share data, backbone, model, Stage 1 and ``training.batch_size, seed, device,
    feature_mode, compile_sinkhorn`` (``check_fusable`` says which key differs; ``fusion_key``
    groups a batch of trials). ``callbacks[k]`` sees trial k's epoch records and may stop it.
    ``EpochRecord.seconds`` is the wall time of the fused epoch, shared by the group.
    """
    configs = list(configs)
    check_fusable(configs)
    callbacks = list(callbacks) if callbacks is not None else [None] * len(configs)
    if len(callbacks) != len(configs):
        raise ValueError(f"train_fused: {len(callbacks)} callbacks for {len(configs)} configs")
    if write_outputs:
        for config in configs:
            make_run_dir(config)
    first = configs[0]
    prepared = prepared or prepare(first, progress=progress, with_test_caches=False)
    shared = first.training
    device = resolve_device(shared.device)
    compile_sinkhorn(shared.compile_sinkhorn and any(c.training.lambda_fair > 0 for c in configs), device)

    frame = prepared.manifest.frame
    train_rows, val_rows = (np.flatnonzero(frame["split"].to_numpy() == s) for s in ("train", "val"))
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.float32)
    groups = torch.tensor(frame["group"].to_numpy(), dtype=torch.long)
    train_source, val_source = training_source(prepared, first, train_rows, device), rows_source(prepared, val_rows, device, shared.feature_mode)
    prior_fake = float(labels[train_rows].mean())

    model, trials = _start_group(configs, callbacks, prepared, prior_fake, device)
    everyone = list(trials)

    shuffle = torch.Generator().manual_seed(shared.seed)
    y_train, g_train = labels[train_rows], groups[train_rows]
    y_train_dev = y_train.to(device)
    y_val, g_val = labels[val_rows].numpy(), groups[val_rows].numpy()
    without_real, without_fake = groups_left_out(prepared.manifest.group_names, y_val, g_val)  # one data set: logged once
    for trial in trials:
        trial.result.val_groups_without_real, trial.result.val_groups_without_fake = list(without_real), list(without_fake)
    steps = -(-len(train_rows) // shared.batch_size)
    max_epochs = max(c.training.num_epochs for c in configs)

    bar = tqdm(range(1, max_epochs + 1), desc=f"epochs ({len(trials)} fused)", unit="epoch", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        count = len(trials)
        sums = torch.zeros(count, 3, device=device)
        finite = torch.ones(count, dtype=torch.bool, device=device)
        smoothing = torch.tensor([[1 - t.cfg.label_smoothing] for t in trials], dtype=torch.float32, device=device)
        offset = torch.tensor([[0.5 * t.cfg.label_smoothing] for t in trials], dtype=torch.float32, device=device)
        lambdas = torch.tensor([t.cfg.lambda_fair for t in trials], dtype=torch.float32, device=device)
        fair_groups = _fair_groups(trials, device)
        dropout = _dropout(trials, model.dropout_p, device)
        order = torch.randperm(len(train_rows), generator=shuffle).split(shared.batch_size)
        items = source_batches(order, first.augment, shared.seed, epoch, len(train_rows))
        for step, (tokens, batch) in enumerate(zip(read_batches(train_source, items), order)):
            for trial in trials:
                set_lr(trial.optimizer, lr_factor(epoch - 1 + step / steps, trial.cfg))
            batch_dev = batch.to(device, non_blocking=True)
            y = y_train_dev[batch_dev]
            y_cpu, g_cpu = y_train[batch], g_train[batch]
            with autocast(device):
                logits = model(tokens.cls, tokens.patches, dropout)[0].float()  # [K, B]
            target = y * smoothing + offset
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
            fair = _fair_loss(logits, y_cpu, g_cpu, trials, fair_groups, lambdas, fuse=fuse_fairness, compiled=shared.compile_sinkhorn)
            loss = bce + fair
            model.zero_grad_stacked()
            loss.sum().backward()
            model.publish_grads()
            for k, trial in enumerate(trials):
                if trial.cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(model.views(k).values()), trial.cfg.grad_clip)
                trial.optimizer.step()
                trial.optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss.detach(), bce.detach(), fair.detach()], dim=1) * len(batch)
            finite &= torch.isfinite(loss.detach())

        seconds_train = time.perf_counter() - start
        finite_host = finite.tolist()
        survivors = [k for k in range(count) if finite_host[k] and epoch <= trials[k].cfg.num_epochs]
        for k, trial in enumerate(trials):
            if not finite_host[k]:
                trial.result.status, trial.result.stop_reason = "diverged", f"non-finite loss (nan/inf) in epoch {epoch}"
                log.warning("trial %d stopped: %s", everyone.index(trial), trial.result.stop_reason)
        model.keep(survivors)
        trials = [trials[k] for k in survivors]
        sums = sums[survivors]
        if not trials:
            break
        scores, gates = _predict_fused(model, val_source, validation_batch_size(shared.batch_size), device)
        seconds = time.perf_counter() - start
        keep = []
        for k, trial in enumerate(trials):
            cfg = trial.cfg
            result = trial.result
            if reason := non_finite_scores_reason(scores[k], epoch):  # this trial only: the others train on
                result.status, result.stop_reason = "diverged", reason
                log.warning("trial %d stopped: %s", everyone.index(trial), reason)
                continue
            record = epoch_record(epoch, trial.optimizer.param_groups[0]["lr"], (sums[k] / len(train_rows)).tolist(), y_val, scores[k],
                                  g_val, gates[k], cfg.threshold, seconds)
            if close_epoch(result, record, trial.callback, cfg):
                trial.best_state = model.state_dict_of(k)
            if result.status == "stopped":
                log.info("trial %d stopped after epoch %d: %s", everyone.index(trial), epoch, result.stop_reason)
            elif epoch < cfg.num_epochs:
                keep.append(k)
        log.info("fused epoch %d/%d: %d trials, %.1fs (train %.1fs)", epoch, max_epochs, len(trials), seconds, seconds_train)
        bar.set_postfix(trials=len(keep), seconds=f"{seconds:.1f}")
        model.keep(keep)
        trials = [trials[k] for k in keep]
        if not trials:
            break
    bar.close()
    results = []
    for trial in everyone:
        if write_outputs:
            trial.result.output_dir = write_run_outputs(trial.config, trial.result, trial.best_state)
        results.append(trial.result)
    return results
