"""Key management edge cases: a site's he/ folder under ``keys verify``, a manifest
edited after export, new keys in an encrypted federation, damaged provisioning files, an older
revocation list, and envelopes from a revoked site (real keys, real TenSEAL contexts)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fedfms_secure.cli import main
from fedfms_secure.site.hekeys import bundle_removed_sites
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import params_fingerprint
from fedfms_secure.he.ckks import CkksParams, new_secret_context, serialize_site_context
from fedfms_secure.keys.envelope import open_envelope, seal_for_sites
from fedfms_secure.keys.hestore import HeStore
from fedfms_secure.keys.keycheck import verify_bundle
from fedfms_secure.keys.bundle import load_bundle, load_envelope_key
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.federation import read_federation
from fedfms_secure.keys.lifecycle import install_crl, revoke, rotate_tls
from fedfms_secure.keys.provision import add_client, init_federation
from fedfms_secure.he.packing import fit_params
from fedfms_secure.errors import ConfigError, KeyMaterialError

PARAMS = fit_params(bound=1.0, sites=3, rounds=3)
RESTORE = "restore it from a backup of the provisioning folder"


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


def test_no_new_key_is_written_in_the_clear_in_an_encrypted_federation(tmp_path: Path) -> None:
    prov = init_federation(tmp_path / "prov", federation="h", server_host="localhost", clients=["a", "b"],
                           params=fit_params(bound=1.0, sites=3, rounds=3))
    add_client(prov, "c", passphrase=b"pass")  # from now on the federation's keys are encrypted
    assert read_federation(prov)["encrypted"]
    before = (prov / "clients" / "c" / "tls.key").read_bytes()
    for call in (lambda: rotate_tls(prov, ["c"]), lambda: rotate_tls(prov, None, server=True)):
        with pytest.raises(ConfigError, match=rf"{prov / 'federation.json'}.*--passphrase-file"):
            call()
    assert (prov / "clients" / "c" / "tls.key").read_bytes() == before
    assert "revocations" in read_federation(prov) and read_federation(prov)["revocations"] == []
    rotate_tls(prov, ["c"], passphrase=b"pass")
    assert pki.is_encrypted_pem((prov / "clients" / "c" / "tls.key").read_bytes())


def test_export_refuses_damaged_or_mismatched_provisioning_files(fed: dict[str, Path], tmp_path: Path) -> None:
    cases = {
        "clients/a/tls.crt": b"garbage",
        "ca/ca.crt": b"garbage",
        "clients/a/tls.key": b"garbage",
        "clients/a/envelope.key": b"garbage",
    }
    for rel, data in cases.items():
        prov = _copy(fed["prov"], tmp_path / f"prov-{rel.replace('/', '-')}")
        (prov / rel).write_bytes(data)
        out = tmp_path / f"out-{rel.replace('/', '-')}"
        with pytest.raises(KeyMaterialError, match=rf"{prov / rel} is not a PEM .*{RESTORE}"):
            export_bundle("client", "a", prov, out)
        assert not out.exists()  # no broken bundle leaves the host
    prov = _copy(fed["prov"], tmp_path / "swapped")
    shutil.copy(prov / "clients" / "b" / "envelope.key", prov / "clients" / "a" / "envelope.key")
    with pytest.raises(KeyMaterialError, match=rf"{prov / 'clients/a/envelope.key'} is not the envelope key"):
        export_bundle("client", "a", prov, tmp_path / "o1")
    shutil.copy(prov / "clients" / "b" / "tls.key", prov / "clients" / "a" / "tls.key")
    shutil.copy(prov / "clients" / "b" / "tls.crt", prov / "clients" / "a" / "tls.crt")
    with pytest.raises(KeyMaterialError, match=r"clients/a/tls.crt is issued to 'b', not to site 'a'"):
        export_bundle("client", "a", prov, tmp_path / "o2")
    shutil.copy(prov / "clients" / "b" / "tls.crt", prov / "server" / "tls.crt")
    with pytest.raises(KeyMaterialError, match=r"server/tls.key is not the private key of .*server/tls.crt"):
        export_bundle("server", None, prov, tmp_path / "o3")
    # a damaged file of the provisioning folder is restored, not exported again
    with pytest.raises(KeyMaterialError, match=rf"clients/zz/tls.crt does not exist; {RESTORE}"):
        pki.load_cert(prov / "clients" / "zz" / "tls.crt", remedy=RESTORE + ", or provision again")


def test_an_older_revocation_list_never_replaces_a_newer_one(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    prov = init_federation(tmp_path / "prov", federation="h", server_host="localhost", clients=["a", "b", "c"],
                           params=PARAMS)
    server = export_bundle("server", None, prov, tmp_path / "server")
    site = export_bundle("client", "c", prov, tmp_path / "c")
    # --server-bundle naming a site's bundle fails before anything is revoked
    assert main(["keys", "revoke", "a", "--from", str(prov), "--server-bundle", str(site)]) == 1
    assert "is a client bundle (of 'c')" in capsys.readouterr().err
    assert read_federation(prov)["revocations"] == []
    revoke(prov, "a")
    first = (prov / "ca" / "crl.pem").read_bytes()
    revoke(prov, "b")
    install_crl(prov, server)
    newer = (server / "crl.pem").read_bytes()
    (prov / "ca" / "crl.pem").write_bytes(first)  # a provisioning folder restored from an older backup
    with pytest.raises(KeyMaterialError, match=r"crl.pem is revocation list number 2, newer than .*number 1"):
        install_crl(prov, server)
    with pytest.raises(KeyMaterialError, match=r"newer than"):
        export_bundle("server", None, prov, server, update=True)
    assert (server / "crl.pem").read_bytes() == newer
    # the refused update left the bundle as it was (exported before both revocations)
    assert load_bundle(server, role="server").clients == ("a", "b", "c")


def test_a_site_refuses_an_envelope_from_a_revoked_site(tmp_path: Path) -> None:
    prov = init_federation(tmp_path / "prov", federation="h", server_host="localhost", clients=["a", "b", "c"],
                           params=PARAMS)
    site = export_bundle("client", "a", prov, tmp_path / "a")
    revoke(prov, "c", reason="key-compromise")
    # c's certificate is still within its lifetime and a's manifest still lists c: a malicious
    # server could relay a key that c made
    bundle = load_bundle(site, role="client")
    assert "c" in bundle.clients and bundle_removed_sites(bundle) == set()
    context = serialize_site_context(new_secret_context(PARAMS))
    c = prov / "clients" / "c"
    envelope = seal_for_sites(context, federation="h", epoch=2, params=PARAMS, sender="c",
                              sender_key=pki.load_private_key(c / "tls.key"),
                              sender_cert_pem=(c / "tls.crt").read_bytes(),
                              recipients={"a": bundle.envelope_keys["a"]})["a"]
    args = dict(recipient="a", recipient_key=load_envelope_key(site), federation="h", sites=bundle.clients,
                ca_pem=bundle.ca_pem, params=PARAMS, epoch=2)
    assert open_envelope(envelope, **args).header.sender == "c"  # what a site without the list accepts

    # the site's bundle, updated after the revocation, carries the CA's list; c's envelope is refused
    export_bundle("client", "a", prov, site, update=True)
    assert (site / "crl.pem").read_bytes() == (prov / "ca" / "crl.pem").read_bytes()
    assert verify_bundle(site)["ok"]
    bundle = load_bundle(site, role="client")
    assert bundle_removed_sites(bundle) == {"c"}
    with pytest.raises(KeyMaterialError, match=r"sender 'c' was revoked by the federation CA"):
        open_envelope(envelope, revoked_sites=bundle_removed_sites(bundle), **args)
    # a list the CA did not sign is an error naming the file, never an empty list
    other = init_federation(tmp_path / "other", federation="h", server_host="localhost", clients=["a", "c"],
                            params=PARAMS)
    revoke(other, "a")
    (site / "crl.pem").write_bytes((other / "ca" / "crl.pem").read_bytes())
    with pytest.raises(KeyMaterialError, match=rf"{site / 'crl.pem'} is not signed by this federation's CA"):
        bundle_removed_sites(bundle)


def test_the_site_key_store_never_goes_back_nor_overwrites_its_current_key(fed: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    store = HeStore(_copy(fed["a"], tmp_path / "a"))
    data = serialize_site_context(new_secret_context(PARAMS))
    current = store.put(2, data)
    other = serialize_site_context(new_secret_context(PARAMS))
    with pytest.raises(KeyMaterialError, match=r"already holds CKKS key epoch 2 .*refusing epoch 1"):
        store.put(1, other)
    with pytest.raises(KeyMaterialError, match=r"refusing epoch 2 .*another key of its epoch"):
        store.put(2, other)
    # a rotation started from epoch 1 while another site's epoch 2 arrived must not replace epoch-2.ctx
    with pytest.raises(KeyMaterialError, match=r"refusing a rotation to epoch 2 .*run `fedfms-secure keys rotate-he`"):
        store.put(2, other, pending=True)
    assert store.current() == current and store.pending() is None
    assert store.context_bytes(current) == data  # the file is intact
    assert store.put(2, data) == current  # storing the same key again is harmless
