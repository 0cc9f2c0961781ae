"""Export a trial as the training-config YAML that `run_study.py train` accepts as is.

The file holds the study's data/backbone/model/stage1 sections and the trial's full training
section (sampled values, fixed values and seed); its metrics and provenance go in a comment
block, so the file stays a plain training config. Re-training it reproduces the trial.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial

import objectives
from model.config import TrainingConfig, TrainRunConfig, train_config_to_yaml_dict
from model.files import replace_whole
from model.typed_config import from_dict
from search.config import StudyConfig

_FIRST_LINE = "# fairfront export:"  # how every export starts (an earlier one may be overwritten)


def trial_train_config(study_config: StudyConfig, trial: FrozenTrial) -> TrainRunConfig:
    """The exact training config the trial ran, with outputs going to a fresh folder, on the
    study's own device setting (a worker pinned to cuda:3 must not make the export need 4 GPUs)."""
    training = from_dict(TrainingConfig, trial.user_attrs["training"], where="training")
    base = study_config.base_run_config()
    training = dataclasses.replace(training, device=base.training.device)
    return dataclasses.replace(
        base, training=training, output_dir=study_config.workdir / "retrain" / study_config.name / f"trial-{trial.number:05d}"
    )


def retrain_threads(trial: FrozenTrial) -> int | None:
    """The torch thread count a CPU trial ran with, which its re-training needs to reproduce it
    bit for bit; None for a GPU trial."""
    return trial.user_attrs.get("torch_threads") if str(trial.user_attrs.get("device", "cpu")).startswith("cpu") else None


def header(study: optuna.Study, study_config: StudyConfig, trial: FrozenTrial, pick: str) -> str:
    threads = retrain_threads(trial)
    lines = [
        f"{_FIRST_LINE[2:]} study {study.study_name!r}, trial {trial.number}, picked by --pick {pick!r}",
        "objectives: " + ", ".join(f"{m} ({d}) {v:.4f}" for m, d, v in zip(study_config.metric_names, study_config.directions, trial.values)),
        "validation metrics at best epoch "
        f"{trial.user_attrs.get('best_epoch')}: " + ", ".join(f"{m} {trial.user_attrs.get(f'val_{m}', float('nan')):.4f}" for m in objectives.METRIC_NAMES),
        f"gate at the best epoch {trial.user_attrs.get('gate_min', float('nan')):.3f}-{trial.user_attrs.get('gate_max', float('nan')):.3f} "
        f"(mean {trial.user_attrs.get('gate_mean', float('nan')):.3f}), "
        f"fair-term share {100 * trial.user_attrs.get('fair_share', float('nan')):.2f}%",
        "sampled: " + ", ".join(f"{k}={v}" for k, v in trial.params.items()),
        f"code version {trial.user_attrs.get('code_version', 'unknown')}",
        f"ran on {trial.user_attrs.get('device', 'the study device')} with {trial.user_attrs.get('torch_threads', '?')} torch threads "
        "(on the CPU, bit-identical metrics need the same thread count)",
        "re-train: python run_study.py train --config <this file>" + (f" --threads {threads}" if threads else ""),
    ]
    return "".join(f"# {line}\n" for line in lines)


def check_export_target(out: Path) -> None:
    """Write only to a new file or over an earlier export: ``--out`` pointed at the study's
    database or YAML by mistake must not replace it."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of a YAML file to write")
    if out.exists():
        with open(out, "rb") as handle:
            start = handle.read(len(_FIRST_LINE))
        if start != _FIRST_LINE.encode():
            raise ValueError(f"--out {out} exists and is not a fairfront export; it is left as it is (give a new file name)")


def export_trial(study: optuna.Study, study_config: StudyConfig, trial: FrozenTrial, out: Path, *, pick: str) -> Path:
    out = Path(out).resolve()
    check_export_target(out)
    config = trial_train_config(study_config, trial)
    body = yaml.safe_dump(train_config_to_yaml_dict(config, relative_to=out.parent), sort_keys=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = header(study, study_config, trial, pick) + body
    return replace_whole(out, lambda partial: partial.write_text(text))
