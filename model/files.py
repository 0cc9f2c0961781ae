"""Files replaced whole: a reader, or a run cut short (a full disk, Ctrl-C, SIGKILL), sees the old
file or the new one, never half of one. A half-written YAML still loads with defaults in place of
its missing keys, and a half-written CSV or checkpoint replaces a good one."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def replace_whole(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(temporary)`` into a hidden sibling of ``path``, then rename it over ``path``.

    The sibling keeps the suffix (matplotlib and pandas choose the format from it) and has a
    random name (writers on other nodes share the folder; a pid can repeat there). It is removed
    if ``write`` fails; only a SIGKILL between the two steps can leave one behind. A symbolic link
    is written through (the link stays a link), and the file keeps the old one's permissions (an
    export a team made group-writable stays so); a new file gets the umask's, as ``open`` gives."""
    given = path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    partial = path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex}{path.suffix}")
    try:
        write(partial)
        with contextlib.suppress(FileNotFoundError):  # (no old file)
            shutil.copymode(path, partial)
        partial.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's own error is the one to see
            partial.unlink(missing_ok=True)
        raise
    return given


__all__ = ["replace_whole"]
