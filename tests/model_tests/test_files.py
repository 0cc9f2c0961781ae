"""replace_whole: the old file or the new one, never half of one, and nothing left beside them."""

import os
import stat
from pathlib import Path

import pytest

from model.files import replace_whole


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "best.yaml"
    path.write_text("old: 1\n")

    def half_then_fail(partial):
        partial.write_text("new: ")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        replace_whole(path, half_then_fail)
    assert path.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["best.yaml"]


def test_the_new_file_replaces_the_old_and_the_writer_sees_its_suffix(tmp_path):
    path, seen = tmp_path / "front.png", []

    def write(partial):
        seen.append(partial)
        partial.write_bytes(b"new")

    assert replace_whole(path, write) == path and path.read_bytes() == b"new"
    assert seen[0].parent == tmp_path and seen[0].suffix == ".png" and seen[0].name.startswith(".front.partial-")
    assert [p.name for p in tmp_path.iterdir()] == ["front.png"]


def test_the_new_file_keeps_the_old_ones_permissions_and_a_link_stays_a_link(tmp_path):
    shared = tmp_path / "team" / "best.yaml"
    shared.parent.mkdir()
    shared.write_text("old: 1\n")
    shared.chmod(0o664)  # group-writable, where the umask would give 0o644
    link = tmp_path / "best.yaml"
    link.symlink_to(shared)

    assert replace_whole(link, lambda partial: partial.write_text("new: 2\n")) == link
    assert link.is_symlink() and link.read_text() == "new: 2\n"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664
    assert sorted(p.name for p in shared.parent.iterdir()) == ["best.yaml"]


def test_a_write_error_is_not_hidden_by_a_failed_clean_up(tmp_path, monkeypatch):
    """On a read-only mount the write fails and so does removing its leftover: the user must see
    the first error (read-only file system), not the second."""
    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", os.fspath(self))

    monkeypatch.setattr(Path, "unlink", refuse)

    def write(partial):
        raise OSError(30, "Read-only file system", os.fspath(partial))

    with pytest.raises(OSError, match="Read-only file system"):
        replace_whole(tmp_path / "report.md", write)
