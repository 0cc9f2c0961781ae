"""Score a saved model on a feature cache: what cross-dataset evaluation needs from model/.

``load_detector`` rebuilds the AdapterDetector of a run's ``best.pt`` (the Stage 1 weights are
in the checkpoint too, so a test set is scored exactly as validation was); ``score_cache`` runs
it over chosen rows of a FeatureCache through the same ``predict_scores`` the training uses.
Knows nothing of Optuna.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from model.cache import FeatureCache
from model.config import ModelConfig
from model.detector import AdapterDetector
from model.tokens import CachedTokens
from model.train import SCORING_BATCH_SIZE, predict_scores
from model.typed_config import from_dict


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as an AdapterDetector; the message says why."""


def load_detector(checkpoint: str | Path, *, device: torch.device | str = "cpu") -> AdapterDetector:
    """The detector saved in ``checkpoint`` (a run's best.pt), in eval mode on ``device``."""
    path = Path(checkpoint)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # (garbage bytes: UnpicklingError)
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict) or "stage1.norm.weight" not in saved["state_dict"]:
        raise CheckpointError(f"{path}: not a training checkpoint (no 'state_dict' with the detector's weights)")
    state = saved["state_dict"]
    model = from_dict(ModelConfig, (saved.get("config") or {}).get("model", {}), where="model")
    width = int(state["stage1.norm.weight"].shape[0])
    # dropout is inactive in eval mode and the gate bias is overwritten by the state dict.
    detector = AdapterDetector(width, model, dropout=0.0, gate_init_bias=0.0)
    try:
        detector.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not match the model config it was saved with ({err})") from None
    return detector.to(device).eval()


def score_cache(
    detector: AdapterDetector,
    cache: FeatureCache,
    rows: np.ndarray | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = SCORING_BATCH_SIZE,
) -> np.ndarray:
    """sigmoid scores (probability of fake) for ``rows`` of ``cache`` (default: all), in row order."""
    device = torch.device(device)
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros(0, dtype=np.float64)
    return predict_scores(detector, CachedTokens(cache, rows, device), device=device, batch_size=batch_size)


__all__ = ["CheckpointError", "load_detector", "score_cache"]
