"""Folders that hold keys are created 0700 and private key files 0600, whatever the umask allows."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_folders_are_0700_and_key_files_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: without an explicit mode, folders would be 0755
    try:
        prov = init_federation(tmp_path / "new" / "prov", federation="m", server_host="localhost",
                               clients=["a", "b"], he_dealer=False, passphrase=b"pw")
        bundle = export_bundle("client", "a", prov, tmp_path / "out" / "a")
    finally:
        os.umask(old)
    folders = [prov, prov / "ca", prov / "server", prov / "clients", prov / "clients" / "a", prov / "he",
               bundle, bundle / "peers"]
    assert {str(f): oct(_mode(f)) for f in folders} == {str(f): oct(0o700) for f in folders}
    keys = [prov / "ca" / "ca.key", prov / "server" / "tls.key", prov / "clients" / "a" / "tls.key",
            prov / "clients" / "a" / "envelope.key", bundle / "tls.key", bundle / "envelope.key"]
    assert {str(k): oct(_mode(k)) for k in keys} == {str(k): oct(0o600) for k in keys}
