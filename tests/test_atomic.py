"""The project's one atomic writer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedfms_secure.atomic import write_atomic, write_atomic_with


def test_bytes_land_with_the_mode_and_no_temporary_file(tmp_path) -> None:
    path = tmp_path / "f.bin"
    write_atomic(path, b"abc", mode=0o600)
    assert path.read_bytes() == b"abc"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_writer_callback_saves_torch_and_numpy(tmp_path) -> None:
    doc = {"vector": torch.arange(5.0)}
    write_atomic_with(tmp_path / "m.pt", lambda handle: torch.save(doc, handle))
    torch.testing.assert_close(torch.load(tmp_path / "m.pt")["vector"], doc["vector"])
    write_atomic_with(tmp_path / "a.npy", lambda handle: np.save(handle, np.ones(3)))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.ones(3))


def test_a_failing_writer_keeps_the_old_file_and_leaves_nothing_behind(tmp_path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def half(handle) -> None:
        handle.write(b"new but ")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomic_with(path, half)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_symlink_is_replaced_not_written_through(tmp_path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    write_atomic(link, b"new")
    assert target.read_bytes() == b"keep" and not link.is_symlink() and link.read_bytes() == b"new"
