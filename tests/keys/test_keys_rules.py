"""One implementation of each bundle rule: ``keys verify`` reports exactly what ``load_bundle`` raises."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fedfms_secure.he.ckks import CkksParams, new_secret_context, serialize_site_context
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import load_bundle, load_envelope_key
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.keycheck import verify_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.keys.rules import BundleProblem


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rules")
    prov = init_federation(root / "prov", federation="r", server_host="localhost", clients=["a", "b"],
                           he_dealer=False)
    locked = init_federation(root / "locked", federation="r", server_host="localhost", clients=["a"],
                             he_dealer=False, passphrase=b"pw")
    other = init_federation(root / "other", federation="r", server_host="localhost", clients=["a"], he_dealer=False)
    return {
        "prov": prov,
        "other": other,
        "server": export_bundle("server", None, prov, root / "server"),
        "a": export_bundle("client", "a", prov, root / "a"),
        "locked": export_bundle("client", "a", locked, root / "locked-a"),
    }


def _fix_checksum(bundle: Path, name: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _tampered_cert(fed: dict[str, Path], b: Path) -> None:
    (b / "tls.crt").write_bytes((fed["other"] / "clients" / "a" / "tls.crt").read_bytes())


def _foreign_cert_checksum_fixed(fed: dict[str, Path], b: Path) -> None:
    _tampered_cert(fed, b)
    _fix_checksum(b, "tls.crt")


def _missing_ca(fed: dict[str, Path], b: Path) -> None:
    (b / "ca.crt").unlink()


def _loose_key(fed: dict[str, Path], b: Path) -> None:
    os.chmod(b / "tls.key", 0o644)


def _swapped_envelope_key(fed: dict[str, Path], b: Path) -> None:
    pki.write_private(b / "envelope.key", pki.pem_private_key(pki.new_envelope_key()))
    _fix_checksum(b, "envelope.key")


def _extra_file_listed(fed: dict[str, Path], b: Path) -> None:
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["files"]["ckks.ctx"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(manifest))


def _server_secret(fed: dict[str, Path], b: Path) -> None:
    params = CkksParams.from_dict(json.loads((b / "manifest.json").read_text())["ckks"]["params"])
    pki.write_private(b / "ckks.ctx", serialize_site_context(new_secret_context(params.ring)))
    os.chmod(b / "ckks.ctx", 0o644)
    _fix_checksum(b, "ckks.ctx")


BROKEN: dict[str, tuple[str, str, Callable[[dict[str, Path], Path], None]]] = {
    "tampered certificate": ("a", "client", _tampered_cert),
    "foreign certificate, checksum fixed": ("a", "client", _foreign_cert_checksum_fixed),
    "missing CA certificate": ("a", "client", _missing_ca),
    "private key readable by others": ("server", "server", _loose_key),
    "envelope key swapped": ("a", "client", _swapped_envelope_key),
    "manifest lists a file the bundle must not hold": ("a", "client", _extra_file_listed),
    "server context with the secret key": ("server", "server", _server_secret),
    "encrypted key, no passphrase": ("locked", "client", lambda fed, b: None),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_verify_reports_what_load_raises(case: str, fed: dict[str, Path], tmp_path: Path) -> None:
    source, role, breaks = BROKEN[case]
    bundle = Path(shutil.copytree(fed[source], tmp_path / "b"))
    breaks(fed, bundle)
    with pytest.raises(BundleProblem) as info:
        load_bundle(bundle, role=role)
    problem = info.value
    assert str(problem).startswith(problem.file) or str(problem).startswith(problem.problem)
    assert str(problem).endswith(f"; {problem.fix}")
    report = verify_bundle(bundle)
    assert not report["ok"]
    assert problem.as_dict() in report["problems"], (problem.as_dict(), report["problems"])


def test_load_envelope_key_applies_the_same_rules(fed: dict[str, Path], tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(fed["a"], tmp_path / "b"))
    _swapped_envelope_key(fed, bundle)
    with pytest.raises(BundleProblem) as info:
        load_envelope_key(bundle)
    assert info.value.as_dict() in verify_bundle(bundle)["problems"]


def test_a_sound_bundle_breaks_no_rule(fed: dict[str, Path]) -> None:
    for name, role in (("server", "server"), ("a", "client")):
        load_bundle(fed[name], role=role)
        assert verify_bundle(fed[name])["ok"]
