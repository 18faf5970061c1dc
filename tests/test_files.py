"""atomic_write: the target appears complete or not at all."""
import os

import pytest

from olmo2.files import atomic_copy, atomic_write


def test_writes_text_and_bytes(tmp_path):
    with atomic_write(tmp_path / "a.txt") as f:
        f.write("hello")
    with atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "a.txt").read_text() == "hello" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_copy(tmp_path / "b.bin", tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "c.bin"]  # no temporary file left


def test_failure_keeps_the_old_file(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(tmp_path / "a.txt") as f:
            f.write("half of the new")
            raise RuntimeError("disk full (simulated)")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_a_write_error_names_the_file(tmp_path, monkeypatch):
    import errno

    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(OSError) as info:
        with atomic_write(tmp_path / "a.txt") as f:
            f.write("new")
            raise OSError(errno.ENOSPC, "No space left on device")  # as a short write raises it
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
