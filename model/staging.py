"""Staging folders: a folder built beside its final place, renamed into place when whole, and
swept away when the process building it died (SIGKILL, OOM, a preempted node), which no
``except`` could clean up: ~50 GB for a ViT-L feature cache of FF++.

A build holds a lock (flock) on a marker file in its staging folder until it publishes; the kernel,
or the NFS server, releases it when the process dies. (Not with NFS's ``local_lock=flock`` mount
option, under which a running build on another node would look dead.) Folders without a marker are
left as they are: one being published this instant, or one from a fairfront before markers.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".building"  # removed by ``ready`` before the folder is renamed into place


def _name(target: Path, kind: str, hidden: bool) -> str:
    return f"{'.' if hidden else ''}{target.name}.{kind}-"


@contextlib.contextmanager
def staging_folder(target: Path, *, hidden: bool = False, what: str = "a build") -> Iterator[Path]:
    """A new folder beside ``target`` (``<target>.partial-<random>``, with a leading dot when
    ``hidden``), held by this process while the block runs. Earlier staging folders of ``target``
    whose process died are removed first. The block calls ``ready`` and renames the folder to
    ``target`` when its contents are whole; a folder still here when the block ends (it raised, or
    another process published first) is removed once the marker is closed: on NFS an open file
    that is deleted lingers as a ``.nfsXXXX`` file and the folder cannot be removed around it."""
    remove_abandoned(target, hidden=hidden, what=what)
    # A name no other writer has: nodes sharing a workdir may run containers whose processes all
    # have the same pid (1 in a Kubernetes pod), and a pid-named folder was shared and deleted.
    name = uuid.uuid4().hex
    # The folder gets its held marker before it takes a name remove_abandoned looks at.
    starting = target.with_name(_name(target, "starting", hidden) + name)
    staging = target.with_name(_name(target, "partial", hidden) + name)
    starting.mkdir(parents=True)
    marker = open(starting / MARKER, "w")
    try:
        fcntl.flock(marker, fcntl.LOCK_EX)
        yield starting.rename(staging)
    finally:
        marker.close()
        # a bad image, a CUDA error, Ctrl-C, a lost race: nothing half-built left behind
        # (``starting`` is gone unless the rename failed; ``staging`` unless it was published)
        for folder in (starting, staging):
            shutil.rmtree(folder, ignore_errors=True)


def ready(staging: Path) -> None:
    """The marker is not part of what is published; the lock stays with the open handle."""
    (staging / MARKER).unlink()


def remove_abandoned(target: Path, *, hidden: bool = False, what: str = "a build") -> None:
    """Remove the staging folders of ``target`` whose process died; keep running and unmarked ones."""
    for staging in target.parent.glob(glob.escape(_name(target, "partial", hidden)) + "*"):
        try:
            handle = open(staging / MARKER)
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its build is running
            log.warning("removing %s, left by %s whose process died", staging, what)
            shutil.rmtree(staging, ignore_errors=True)


__all__ = ["MARKER", "ready", "remove_abandoned", "staging_folder"]
