"""Device choice, seeding, autocast, compilation and output folders: the few lines every entry point needs the same way."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

import objectives

log = logging.getLogger(__name__)


def make_folder(path: Path, key: str, what: str = "the folder") -> Path:
    """An output folder, made before any work: a path that cannot be a folder (a file, no
    permission) fails at once, naming the key that gave it, not after minutes of compute."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{key}: cannot create {what} {path} ({err.strerror})") from None
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device: {name!r} was asked for but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"training.device: {name!r} was asked for but this machine has {torch.cuda.device_count()} visible GPU(s)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (fp16 would overflow the Sinkhorn terms); a no-op on the CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class CompileError(ValueError):
    """training.compile_sinkhorn is on, and torch.compile cannot run on this machine.

    A ValueError: the setting is what the user changes, and the CLI prints such errors as one line.
    """


_compiled_for: set[torch.device] = set()


def compile_sinkhorn(enabled: bool, device: torch.device) -> None:
    """Compile the fairness loss's Sinkhorn iterations before a run spends anything (training.compile_sinkhorn).

    Once per process and device: the compiled code serves every later run. A failure names the key.
    """
    if not enabled or device in _compiled_for:
        return
    start = time.perf_counter()
    try:
        objectives.compile_fairness_loss(device)
    except Exception as err:  # inductor and Triton raise many types; all mean "cannot compile here"
        raise CompileError(f"training.compile_sinkhorn: torch.compile failed on {device} ({type(err).__name__}: {err}); "
                           "set it to false to run the Sinkhorn loop uncompiled") from err
    _compiled_for.add(device)
    log.info("compile_sinkhorn: Sinkhorn iterations compiled for %s in %.1f s", device, time.perf_counter() - start)
