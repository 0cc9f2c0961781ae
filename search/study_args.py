"""The command-line arguments that name a study, remembered on the study itself.

A trial's dashboard note and the study report print commands (``export``, ``evaluate``) that need
``--study <file>`` and any ``--storage`` / ``--study-name`` override the study was run with. The
YAML's path is not part of the study definition (it may differ between nodes), so ``optimize``
and ``evaluate`` store the arguments they were given as a study user attribute, and notes and
reports read them back. The storage password is masked; a ``${VAR}`` reference stays one.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import optuna

from search.credentials import mask_url

ATTR = "fairfront_study_args"
UNKNOWN = "--study <study.yaml>"  # a study last run by an older fairfront, or from Python


def format_study_args(study_file: str | Path, *, storage: str | None = None, study_name: str | None = None) -> str:
    """``--study F [--storage URL] [--study-name N]``, quoted for a POSIX shell."""
    parts = ["--study", str(study_file)]
    if storage:
        parts += ["--storage", mask_url(storage)]
    if study_name:
        parts += ["--study-name", study_name]
    return shlex.join(parts)


def remember_study_args(study: optuna.Study, args: str) -> None:
    """Store ``args`` on ``study``. No lock: when a SLURM array's tasks write it at once, Optuna
    keeps one write and drops the others' IntegrityError (they hold the same arguments)."""
    if study.user_attrs.get(ATTR) != args:
        study.set_user_attr(ATTR, args)


def study_args(study: optuna.Study) -> str:
    """The arguments ``optimize`` or ``evaluate`` last named this study with."""
    return study.user_attrs.get(ATTR, UNKNOWN)


__all__ = ["ATTR", "UNKNOWN", "format_study_args", "remember_study_args", "study_args"]
