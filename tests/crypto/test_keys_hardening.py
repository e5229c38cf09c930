"""Key management edge cases: a site's he/ folder under ``keys verify`` and a manifest edited after
export (real keys, real TenSEAL contexts)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fedfms_secure.crypto.bundle import params_fingerprint
from fedfms_secure.crypto.ckks import CkksParams, new_secret_context, serialize_site_context
from fedfms_secure.crypto.hestore import HeStore
from fedfms_secure.crypto.keycheck import verify_bundle
from fedfms_secure.crypto.keystore import export_bundle, init_federation, load_bundle
from fedfms_secure.crypto.packing import fit_params
from fedfms_secure.errors import KeyMaterialError

PARAMS = fit_params(bound=1.0, sites=3, rounds=3)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hardening")
    prov = init_federation(root / "prov", federation="h", server_host="localhost", clients=["a", "b", "c"],
                           params=PARAMS)
    return {"root": root, "prov": prov, "server": export_bundle("server", None, prov, root / "server"),
            "a": export_bundle("client", "a", prov, root / "a")}


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _problems(report: dict) -> str:
    return " | ".join(f"{p['file']}: {p['problem']}" for p in report["problems"])


def test_a_site_with_its_ckks_key_verifies_and_its_he_folder_is_checked(fed: dict[str, Path], tmp_path: Path) -> None:
    bundle = _copy(fed["a"], tmp_path / "a")
    store = HeStore(bundle)
    key = store.put(1, serialize_site_context(new_secret_context(PARAMS)))
    assert oct((bundle / "he" / ".lock").stat().st_mode & 0o777) == "0o600"  # like every file in he/
    report = verify_bundle(bundle)
    assert report["ok"], _problems(report)
    assert any("CKKS key epoch 1" in n for n in report["notes"])
    os.chmod(bundle / "he" / ".lock", 0o644)  # an empty lock left by an older version holds nothing
    assert verify_bundle(bundle)["ok"]

    os.chmod(key.path, 0o644)
    report = verify_bundle(bundle)
    assert not report["ok"] and "epoch-1.ctx: is a private file readable by others" in _problems(report)
    os.chmod(key.path, 0o600)
    # a context swapped for another one is named, with what to do
    key.path.write_bytes(serialize_site_context(new_secret_context(PARAMS)))
    os.chmod(key.path, 0o600)
    report = verify_bundle(bundle)
    assert not report["ok"] and "the file was replaced" in _problems(report)
    assert any(str(bundle / "he") == p["file"] and "he/ folder" in p["fix"] for p in report["problems"])


def test_verify_catches_a_manifest_whose_parameters_are_not_the_contexts(fed: dict[str, Path], tmp_path: Path) -> None:
    bundle = _copy(fed["server"], tmp_path / "server")
    manifest = json.loads((bundle / "manifest.json").read_text())
    params = dict(manifest["ckks"]["params"], poly_modulus_degree=16384)
    manifest["ckks"]["params"] = params
    manifest["ckks"]["params_fingerprint"] = params_fingerprint(CkksParams.from_dict(params))
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = verify_bundle(bundle)
    assert not report["ok"]
    assert f"{bundle / 'ckks.ctx'}: has CKKS parameters" in _problems(report)
    with pytest.raises(KeyMaterialError, match="the manifest says"):  # the daemon refuses it as well
        load_bundle(bundle, role="server")
