"""Files replaced whole: a reader, or a run cut short (a full disk, Ctrl-C, SIGKILL), sees the old
file or the new one, never half of one. A half-written YAML still loads with defaults in place of
its missing keys, and a half-written CSV or checkpoint replaces a good one."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path


def replace_whole(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(temporary)`` into a hidden sibling of ``path``, then rename it over ``path``.

    The sibling keeps the suffix (matplotlib and pandas choose the format from it) and has a
    random name (writers on other nodes share the folder; a pid can repeat there). It is removed
    if ``write`` fails; only a SIGKILL between the two steps can leave one behind."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex}{path.suffix}")
    try:
        write(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


__all__ = ["replace_whole"]
