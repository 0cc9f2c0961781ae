"""The Stage 1 adapter: trained once per (dataset, backbone) on cached CLS tokens, then frozen.

The reference project trains Stage 1 separately and loads its checkpoint for every Stage 2 run;
``stage1.checkpoint`` does exactly that. Without one, ``prepare`` trains a small BCE detector on
the CLS token and stores it under the workdir, keyed by everything it depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from model.config import ModelConfig, Stage1Config
from model.detector import Stage1Adapter
from model.files import replace_whole

log = logging.getLogger(__name__)


class Stage1Error(ValueError):
    pass


def stage1_key(cache_key: str, model: ModelConfig, stage1: Stage1Config) -> str:
    settings = dataclasses.asdict(stage1) | {"checkpoint": None, "hidden_ratio": model.stage1_hidden_ratio, "cache": cache_key}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def train_stage1(
    cls_train: np.ndarray, y_train: np.ndarray, cls_val: np.ndarray, y_val: np.ndarray,
    *, model: ModelConfig, config: Stage1Config, device: torch.device,
) -> tuple[Stage1Adapter, float]:
    """Fit Stage 1 + a throwaway linear head with BCE; returns the adapter and its val AUC."""
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        adapter = Stage1Adapter(cls_train.shape[1], model).to(device)
        head = nn.Linear(cls_train.shape[1], 1).to(device)
    params = list(adapter.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    x = torch.as_tensor(np.asarray(cls_train, dtype=np.float32), device=device)
    y = torch.as_tensor(y_train, dtype=torch.float32, device=device)
    for _ in range(config.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(config.batch_size):
            loss = F.binary_cross_entropy_with_logits(head(adapter(x[batch])).squeeze(-1), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        scores = head(adapter(torch.as_tensor(np.asarray(cls_val, dtype=np.float32), device=device))).squeeze(-1)
    auc = float(roc_auc_score(y_val, scores.cpu().numpy()))
    adapter.requires_grad_(False)
    return adapter.eval(), auc


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A checksum of the weights: torch.load checks no CRC, so flipped bits would load as weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + b"\0" + state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_stage1(path: Path, adapter: Stage1Adapter, *, key: str, width: int, val_auc: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = adapter.state_dict()
    blob = {"state_dict": state, "key": key, "width": width, "val_auc": val_auc, "state_sha256": state_sha256(state)}
    replace_whole(path, lambda partial: torch.save(blob, partial))


def load_stage1_state(path: Path, width: int, model: ModelConfig, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """The Stage 1 weights from a checkpoint, checked against the backbone width and the adapter
    shape that ``model.stage1_hidden_ratio`` gives (so a mismatch fails in prepare, not in every trial),
    against the checksum ``save_stage1`` stored with them, and (``key``) against the settings and
    cache it was trained for."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load of a file that is no checkpoint raises KeyError, UnpicklingError, ...
        raise Stage1Error(f"stage1.checkpoint: cannot load {path} as a torch checkpoint: {type(err).__name__}: {err}") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or "fc1.weight" not in state:
        raise Stage1Error(f"stage1.checkpoint: {path} holds no Stage 1 adapter state (keys norm.*, fc1.*, fc2.*)")
    if "state_sha256" in blob and blob["state_sha256"] != state_sha256(state):
        raise Stage1Error(f"stage1.checkpoint: {path} is damaged: its weights do not match the checksum saved with them")
    if key is not None and blob.get("key") != key:
        raise Stage1Error(f"stage 1: {path} was trained for other settings or data (key {str(blob.get('key'))[:16]}, wanted {key[:16]})")
    if state["fc1.weight"].shape[1] != width:
        raise Stage1Error(f"stage1.checkpoint: {path} is for width {state['fc1.weight'].shape[1]}, the backbone has {width}")
    try:
        Stage1Adapter(width, model).load_state_dict(state)
    except RuntimeError as err:
        hidden = state["fc1.weight"].shape[0]
        raise Stage1Error(f"stage1.checkpoint: {path} has hidden size {hidden} (stage1_hidden_ratio {hidden / width:g}), "
                          f"model.stage1_hidden_ratio {model.stage1_hidden_ratio:g} needs {round(width * model.stage1_hidden_ratio)}"
                          if "size mismatch" in str(err) else f"stage1.checkpoint: {path} does not fit the Stage 1 adapter: {err}") from None
    return state
