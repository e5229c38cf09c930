"""pki.write_private: owner-only, atomic, and never written through a symlink."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedfms_secure.keys import pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_writes_owner_only_and_replaces_a_loose_file(tmp_path: Path) -> None:
    key = tmp_path / "tls.key"
    pki.write_private(key, b"first")
    assert key.read_bytes() == b"first" and _mode(key) == 0o600
    key.chmod(0o644)
    data = os.urandom(1 << 20)  # larger than one write() may take at once
    pki.write_private(key, data)
    assert key.read_bytes() == data and _mode(key) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls.key"]  # no temporary file left


def test_a_crash_before_the_rename_keeps_the_old_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "ca.key"
    pki.write_private(key, b"old key")

    def crash(fd: int) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="power cut"):
        pki.write_private(key, b"new key")
    assert key.read_bytes() == b"old key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key"]


def test_a_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    victim.chmod(0o644)
    link = tmp_path / "tls.key"
    link.symlink_to(victim)
    pki.write_private(link, b"secret")
    assert not link.is_symlink() and link.read_bytes() == b"secret" and _mode(link) == 0o600
    assert victim.read_bytes() == b"do not touch" and _mode(victim) == 0o644
