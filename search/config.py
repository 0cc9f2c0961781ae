"""The study YAML's schema: the training-run sections plus search space, objectives, sampler,
stopping rule, budget, storage, distributed workers, artifact store and warm start. Unknown keys, wrong types, empty or inverted ranges and log
ranges touching 0 are errors that name the key, raised before anything is prepared or trained.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import objectives
from model.config import AugmentConfig, BackboneConfig, DataConfig, ModelConfig, Stage1Config, TrainingConfig, TrainRunConfig
from model.typed_config import ConfigError, convert, expand_env, from_dict, load_yaml

log = logging.getLogger(__name__)

# Sampled jointly, on log scales, always: the reference report found them coupled (raising
# sinkhorn_blur 10x shrank the fair loss ~8x and cancelled a 10x raise of lambda_fair).
COUPLED_PARAMS = ("lr", "weight_decay", "lambda_fair", "sinkhorn_blur")
_TRAINING_FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}
_TRAINING_HINTS = typing.get_type_hints(TrainingConfig)
# run settings, and stopping rules (a sampler would only learn that more patience never hurts)
_NOT_SEARCHABLE = {"device", "feature_mode", "stop_if_degenerate_after", "early_stop_patience", "seed", "compile_sinkhorn"}


@dataclass(frozen=True)
class ParamSpec:
    """One dimension: a numeric range (low, high, optional log and step) or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None  # typed by the training key they are for (StudyConfig)

    def __post_init__(self) -> None:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either low/high or choices, not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
            return
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        for key in ("low", "high", "step"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value}")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0, got {self.step}")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must be > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("step cannot be used with log")
        # Optuna would lower high to the last whole step with only a warning (to low itself when
        # step > high - low, which freezes the dimension); decimals, as Optuna compares them.
        if self.step is not None and (Decimal(str(self.high)) - Decimal(str(self.low))) % Decimal(str(self.step)) != 0:
            raise ValueError(f"step {self.step} does not divide high - low ({self.high} - {self.low}); "
                             "make high = low + a whole number of steps")


@dataclass(frozen=True)
class ObjectiveSpec:
    metric: str
    direction: Literal["maximize", "minimize"] | None = None  # default: the metric's natural one

    def __post_init__(self) -> None:
        if self.metric not in objectives.METRIC_NAMES:
            raise ValueError(f"metric {self.metric!r} is not one of {', '.join(objectives.METRIC_NAMES)}")

    @property
    def resolved_direction(self) -> str:
        return self.direction or objectives.METRIC_DIRECTIONS[self.metric]


@dataclass(frozen=True)
class SamplerConfig:
    # GP by default: on our benchmark (bench/results/sampler_efficiency.md, 8 seeds) its median
    # reached random search's 100-trial hypervolume in 20 trials; multivariate TPE took 47 and
    # NSGA-II 88 (its first generation is random). Its own cost grows with the study (~0.7 s/trial
    # at 30 trials, ~3.2 s at 100 on one CPU core): small next to a GPU trial.
    name: Literal["gp", "tpe", "nsga2", "random"] = "gp"
    seed: int | None = 0
    n_startup_trials: int = 10  # gp and tpe: random trials before the model takes over
    population_size: int = 50  # nsga2

    def __post_init__(self) -> None:
        if self.n_startup_trials < 0:
            raise ValueError(f"n_startup_trials must be >= 0, got {self.n_startup_trials}")
        if self.population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {self.population_size}")


@dataclass(frozen=True)
class StoppingConfig:
    # Stop a trial still degenerate (every val prediction one class) after this many epochs.
    degenerate_after_epochs: int | None = 5
    # infeasible: COMPLETE + violated `degenerate` constraint (GP and NSGA-II learn from it);
    # pruned: PRUNED (only TPE learns from those).
    record_degenerate_as: Literal["infeasible", "pruned"] = "infeasible"

    def __post_init__(self) -> None:
        if self.degenerate_after_epochs is not None and self.degenerate_after_epochs < 1:
            raise ValueError(f"degenerate_after_epochs must be >= 1 or null, got {self.degenerate_after_epochs}")


@dataclass(frozen=True)
class BudgetConfig:
    n_trials: int = 20  # finished (complete or pruned) trials the study aims for, over all workers
    timeout: float | None = None  # seconds for this invocation
    max_failed_trials: int = 10  # give up when this many trials failed in one invocation

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1, got {self.n_trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.max_failed_trials < 1:
            raise ValueError(f"max_failed_trials must be >= 1, got {self.max_failed_trials}")


@dataclass(frozen=True)
class DistributedConfig:
    """Many workers on one storage: how many this node starts, heartbeats, retry of a dead worker's
    trial, database retries."""

    # Worker processes `run_study.py optimize` starts on this node (--workers overrides) and the
    # devices they are pinned to, round-robin (--devices overrides): GPU indices "0,1", "cuda:N",
    # "cpu", or null for every visible GPU (the CPU when none).
    workers: int = 1
    devices: str | None = None
    # Trials each worker trains at a time, in one fused pass over the same cached batches
    # (search/fused_batch.py; --fuse overrides; 1: one at a time). 8 on an H200 gave 6.2x the
    # trials/hour of one (bench/results/trial_scale.md); on a CPU it gains nothing.
    fuse: int = 1
    # A running trial writes a heartbeat this often (seconds); null turns dead-worker recovery off.
    heartbeat_interval: int | None = 30
    # A RUNNING trial whose last heartbeat is older than this is failed by the next worker that
    # looks (seconds; default 4 x heartbeat_interval) ...
    grace_period: int | None = None
    # ... and re-queued with the same parameters, at most this many times (so is a trial whose
    # worker was interrupted: Ctrl-C, SIGTERM).
    max_retry: int = 2
    connect_timeout: float = 10.0  # seconds to reach the database when a worker starts
    retry_seconds: float = 120.0  # transient database errors are retried (with back-off) this long

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.fuse < 1:
            raise ValueError(f"fuse must be >= 1, got {self.fuse}")
        if self.heartbeat_interval is not None and self.heartbeat_interval < 1:
            raise ValueError(f"heartbeat_interval must be >= 1 second or null, got {self.heartbeat_interval}")
        if self.grace_period is not None:
            if self.heartbeat_interval is None:
                raise ValueError("grace_period needs heartbeat_interval")
            if self.grace_period <= self.heartbeat_interval:
                raise ValueError(f"grace_period ({self.grace_period}) must exceed heartbeat_interval ({self.heartbeat_interval})")
        if self.devices is not None and self.devices.strip() != "all":  # (which are visible is known only on the node)
            for item in (i.strip() for i in self.devices.split(",")):
                if not re.fullmatch(r"cpu|\d+|cuda:\d+", item):
                    raise ValueError(f"devices: {item!r} is not a GPU index, cuda:N or cpu (or give all)")
        if self.max_retry < 0:
            raise ValueError(f"max_retry must be >= 0, got {self.max_retry}")
        if self.connect_timeout <= 0 or self.retry_seconds < 0:
            raise ValueError(f"connect_timeout must be > 0 and retry_seconds >= 0, got {self.connect_timeout}, {self.retry_seconds}")

    @property
    def grace_seconds(self) -> int | None:
        if self.heartbeat_interval is None:
            return None
        return self.grace_period or 4 * self.heartbeat_interval


@dataclass(frozen=True)
class StudyConfig:
    name: str
    workdir: Path
    data: DataConfig
    backbone: BackboneConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # cached augmented views of the training images
    search_space: dict[str, ParamSpec] = field(default_factory=dict)
    objectives: list[ObjectiveSpec] = field(
        default_factory=lambda: [ObjectiveSpec("auc"), ObjectiveSpec("f_meo"), ObjectiveSpec("f_fpr")]
    )
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    stopping: StoppingConfig = field(default_factory=StoppingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    storage: str | None = None  # SQLAlchemy URL; default: sqlite file <workdir>/study.db
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # heartbeats, retries
    artifacts: Path | None = None  # artifact store folder; default <workdir>/artifacts
    warm_start: bool = False  # enqueue the reference report's Exp1-3 configurations

    def __post_init__(self) -> None:
        check_study_name(self.name)
        if not self.search_space:
            raise ValueError("search_space: give at least one parameter")
        for name, spec in self.search_space.items():
            if name not in _TRAINING_FIELDS or name in _NOT_SEARCHABLE:
                searchable = sorted(set(_TRAINING_FIELDS) - _NOT_SEARCHABLE)
                raise ValueError(f"search_space.{name}: not a searchable training key; valid: {', '.join(searchable)}")
            if name in COUPLED_PARAMS and spec.choices is None and not spec.log:
                raise ValueError(f"search_space.{name}: must be sampled on a log scale (log: true)")
        for name, spec in self.search_space.items():
            self.search_space[name] = _typed_spec(name, spec)
        _check_range_ends(self.training, self.search_space)
        if self.training.stop_if_degenerate_after is not None:  # base_run_config would overwrite it silently
            raise ValueError("training.stop_if_degenerate_after: a study stops degenerate trials by "
                             "stopping.degenerate_after_epochs (which also records them for the sampler); set that instead")
        if self.stopping.record_degenerate_as == "pruned" and self.sampler.name in ("gp", "nsga2"):
            raise ValueError(f"stopping.record_degenerate_as: pruned trials teach the {self.sampler.name} sampler nothing "
                             "(it learns from COMPLETE trials and their constraints); use infeasible, or sampler tpe")
        if not self.objectives:
            raise ValueError("objectives: give at least one")
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"objectives: a metric is listed twice: {metrics}")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.workdir / 'study.db'}"

    @property
    def artifact_dir(self) -> Path:
        return self.artifacts or self.workdir / "artifacts"

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.resolved_direction for o in self.objectives]

    def base_run_config(self) -> TrainRunConfig:
        """The training run every trial starts from (before its sampled parameters)."""
        training = self.training
        if self.stopping.degenerate_after_epochs is not None:
            training = dataclasses.replace(training, stop_if_degenerate_after=self.stopping.degenerate_after_epochs)
        return TrainRunConfig(
            workdir=self.workdir, data=self.data, backbone=self.backbone, model=self.model,
            stage1=self.stage1, training=training, augment=self.augment, output_dir=None,
        )


def _value_type(hint: Any) -> Any:
    """``int`` for ``int | None`` and so on: the type a non-null value of the key has."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _typed_spec(name: str, spec: ParamSpec) -> ParamSpec:
    """``spec`` in the training key's own type, so that a bad value fails here, not in a trial:
    choices are converted as the key itself would be (YAML's 16 stays an int, "1e-4" becomes a
    float, an optimizer that does not exist is refused); a range needs a numeric key, and
    integer bounds for an integer key."""
    where, value_type = f"search_space.{name}", _value_type(_TRAINING_HINTS[name])
    if spec.choices is not None:
        return dataclasses.replace(spec, choices=[
            convert(_TRAINING_HINTS[name], choice, f"{where}.choices[{i}]") for i, choice in enumerate(spec.choices)])
    if value_type not in (int, float):
        raise ValueError(f"{where}: {name} is not numeric; give choices instead of low/high")
    if value_type is int:
        for key in ("low", "high", "step"):
            bound = getattr(spec, key)
            if bound is not None and not float(bound).is_integer():
                raise ValueError(f"{where}.{key}: {name} is an integer, got {bound}")
    return spec


_MAX_END_COMBINATIONS = 4096


def _check_range_ends(training: TrainingConfig, space: dict[str, ParamSpec]) -> None:
    """Every combination of the ends of the ranges and of the choices makes a valid training
    config (for the bounds a config checks, the ends are where a trial can break them): a
    pairing such as warmup_epochs up to 5 with num_epochs from 4 fails here, not in trial 37."""
    ends = {}
    for name, spec in space.items():
        if spec.choices is not None:
            ends[name] = spec.choices
        else:
            cast = int if _value_type(_TRAINING_HINTS[name]) is int else float
            ends[name] = sorted({cast(spec.low), cast(spec.high)})

    def invalid(values: dict[str, Any]) -> str | None:
        try:
            dataclasses.replace(training, **values)
        except ValueError as err:
            return str(err)
        return None

    for combination in itertools.islice(itertools.product(*ends.values()), _MAX_END_COMBINATIONS):
        values = dict(zip(ends, combination))
        if invalid(values) is None:
            continue
        # name the fewest keys that break it: one, else two, else all of them
        subsets = (dict(keys) for size in (1, 2) for keys in itertools.combinations(values.items(), size))
        values = next((subset for subset in subsets if invalid(subset) is not None), values)
        given = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ValueError(f"search_space: a trial with {given} would be an invalid training config ({invalid(values)})")


def check_study_name(name: str) -> None:
    """A study's name is also a path under <workdir>/trials and /retrain, which must stay there
    ('ffpp/v2' is a subfolder, '../x' or '/x' would leave the workdir)."""
    parts = re.split(r"[/\\]", name)
    if not name.strip() or "\0" in name or name.startswith(("/", "\\")) or ".." in parts or all(p in ("", ".") for p in parts):
        raise ValueError(f"name: {name!r} cannot be a study name: its trials' folders are <workdir>/trials/<name>, "
                         "so it must be non-empty and stay inside the workdir (no leading '/', no '..')")


def load_study_config(path: str | Path, *, storage: str | None = None, study_name: str | None = None) -> StudyConfig:
    """Load a study YAML; command-line overrides of storage and name are applied after validation.
    An overridden storage is not read from the YAML at all, so its ``${VAR}`` need not be set."""
    path = Path(path)
    data = load_yaml(path)
    if storage:
        data = {key: value for key, value in data.items() if key != "storage"}
    try:
        config = from_dict(StudyConfig, data, base_dir=path.resolve().parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    changes = {}
    if storage:
        changes["storage"] = expand_env(storage, "--storage")
    if study_name:
        try:
            check_study_name(study_name)
        except ValueError as err:
            raise ConfigError(f"--study-name: {err}") from None
        changes["name"] = study_name
    return dataclasses.replace(config, **changes) if changes else config
