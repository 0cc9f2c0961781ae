"""The adapter detector on frozen CLIP tokens: data, cache, model and one training run.

Knows nothing of Optuna; ``search/`` drives it through :func:`train` and its config.
"""

from model.config import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    ModelConfig,
    Stage1Config,
    TrainingConfig,
    TrainRunConfig,
    load_train_config,
)
from model.prepare import PreparedData, prepare
from model.train import EpochRecord, TrainResult, train
from model.typed_config import ConfigError

__all__ = [
    "AugmentConfig",
    "BackboneConfig",
    "ConfigError",
    "DataConfig",
    "EpochRecord",
    "ModelConfig",
    "PreparedData",
    "Stage1Config",
    "TrainResult",
    "TrainRunConfig",
    "TrainingConfig",
    "load_train_config",
    "prepare",
    "train",
]
