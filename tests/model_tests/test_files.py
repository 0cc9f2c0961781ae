"""replace_whole: the old file or the new one, never half of one, and nothing left beside them."""

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
