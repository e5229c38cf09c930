"""``keys verify`` finds every problem of a bundle; ``keys show`` reports who holds which key."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedfms_secure.cli import main
from fedfms_secure.keys import pki
from fedfms_secure.he.ckks import CkksParams, new_secret_context, serialize_site_context
from fedfms_secure.keys.keycheck import show_federation, verify_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.lifecycle import revoke, rotate_tls
from fedfms_secure.keys.provision import init_federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    prov = init_federation(root / "prov", federation="v", server_host="localhost", clients=["a", "b"],
                           he_dealer=False)
    return {
        "root": root,
        "prov": prov,
        "server": export_bundle("server", None, prov, root / "server"),
        "a": export_bundle("client", "a", prov, root / "a"),
    }


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _verify_cli(bundle: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:
    rc = main(["keys", "verify", str(bundle), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def test_sound_bundles_verify(fed: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("server", "a"):
        rc, report = _verify_cli(fed[name], capsys)
        assert rc == 0 and report["ok"] and report["problems"] == [], report
        modes = {f["file"]: (f["mode"], f["private"]) for f in report["files"]}
        assert modes["tls.key"] == ("600", True) and modes["ca.crt"][1] is False
    assert main(["keys", "verify", str(fed["a"])]) == 0
    assert "client bundle of 'a': OK" in capsys.readouterr().out


def test_verify_catches_a_tampered_file(fed: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _copy(fed["a"], tmp_path / "a")
    other = init_federation(tmp_path / "other", federation="v", server_host="localhost", clients=["a"],
                            he_dealer=False)
    (bundle / "tls.crt").write_bytes((other / "clients" / "a" / "tls.crt").read_bytes())
    rc, report = _verify_cli(bundle, capsys)
    assert rc == 1 and not report["ok"]
    problems = {(Path(p["file"]).name, p["problem"].split(":")[0]) for p in report["problems"]}
    assert ("tls.crt", "does not match its checksum in manifest.json") in problems
    texts = " ".join(f"{p['file']} {p['problem']} {p['fix']}" for p in report["problems"])
    assert "was not issued by this federation's CA" in texts  # the chain check names it too
    assert "is not the private key of tls.crt" in texts
    assert all(p["fix"] for p in report["problems"])
    # the text form lists each problem with its file and its fix, and exits 1
    assert main(["keys", "verify", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert f"problem: {bundle / 'tls.crt'}: does not match its checksum" in out and "fix: export the bundle" in out


def test_verify_catches_wrong_modes(fed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _copy(fed["a"], tmp_path / "a")
    os.chmod(bundle / "envelope.key", 0o644)
    os.chmod(bundle / "ca.crt", 0o666)
    rc, report = _verify_cli(bundle, capsys)
    assert rc == 1
    by_file = {Path(p["file"]).name: p for p in report["problems"]}
    assert "private file readable by others (mode 644)" in by_file["envelope.key"]["problem"]
    assert by_file["envelope.key"]["fix"] == f"run `chmod 600 {bundle / 'envelope.key'}`"
    assert "writable by others (mode 666)" in by_file["ca.crt"]["problem"]
    assert len(report["problems"]) == 2


def test_verify_catches_a_server_bundle_that_can_decrypt(fed: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    params = CkksParams.from_dict(json.loads((fed["server"] / "manifest.json").read_text())["ckks"]["params"])
    secret = serialize_site_context(new_secret_context(params.ring))
    # a secret context in place of ckks.ctx, with its checksum "fixed" in the manifest
    swapped = _copy(fed["server"], tmp_path / "swapped")
    (swapped / "ckks.ctx").write_bytes(secret)
    manifest = json.loads((swapped / "manifest.json").read_text())
    manifest["files"]["ckks.ctx"] = hashlib.sha256(secret).hexdigest()
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    rc, report = _verify_cli(swapped, capsys)
    assert rc == 1
    assert [p["problem"] for p in report["problems"]] == [
        "the server's CKKS context holds the SECRET KEY: the server could decrypt every update"]
    # or slipped in under another name: found by loading every file with TenSEAL
    extra = _copy(fed["server"], tmp_path / "extra")
    pki.write_private(extra / "backup.bin", secret)
    rc, report = _verify_cli(extra, capsys)
    assert rc == 1
    assert [(Path(p["file"]).name, p["problem"]) for p in report["problems"]] == [
        ("backup.bin", "a CKKS context WITH THE SECRET KEY: the server could decrypt every update")]


def test_verify_needs_the_passphrase_and_checks_the_crl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pass").write_text("s3cret\n")
    prov = init_federation(tmp_path / "prov", federation="p", server_host="localhost", clients=["a", "b"],
                           passphrase=b"s3cret", he_dealer=False)
    revoke(prov, "b", passphrase=b"s3cret")
    server = export_bundle("server", None, prov, tmp_path / "server")
    rc, report = _verify_cli(server, capsys)
    assert rc == 1 and [p["fix"] for p in report["problems"]] == ["give the passphrase with --passphrase-file"]
    rc, report = _verify_cli(server, capsys, "--passphrase-file", str(tmp_path / "pass"))
    assert rc == 0, report
    assert any("revocation list number 1, 1 revoked certificate(s), signed by the CA" in n for n in report["notes"])
    # a CRL that is not the CA's
    other = init_federation(tmp_path / "other", federation="p", server_host="localhost", clients=["b"],
                            he_dealer=False)
    revoke(other, "b")
    (server / "crl.pem").write_bytes((other / "ca" / "crl.pem").read_bytes())
    report = verify_bundle(server, passphrase=b"s3cret")
    assert not report["ok"]
    assert "is not signed by this federation's CA" in report["problems"][0]["problem"]


def test_show_json_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prov = init_federation(tmp_path / "prov", federation="s", server_host="localhost", clients=["a", "b", "c"],
                           days=20, he_dealer=False)
    revoke(prov, "b", reason="key-compromise")
    old_c = pki.load_cert(prov / "clients" / "c" / "tls.crt")
    rotate_tls(prov, ["c"], days=200)
    assert main(["keys", "show", "--from", str(prov), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["federation"] == "s" and report["ckks"]["source"] == "site"
    parties = {p["party"]: p for p in report["parties"]}
    assert list(parties) == ["ca", "server", "a", "b", "c"]
    for name, p in parties.items():
        cert_file = prov / p["certificate"]
        cert = pki.load_cert(cert_file)
        assert p["fingerprint_sha256"] == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        assert p["serial"] == format(cert.serial_number, "x")
        assert p["algorithm"] == "ecdsa-p256"
        assert p["not_after"] == cert.not_valid_after_utc.isoformat(timespec="seconds")
    assert parties["a"]["expiring"] and parties["a"]["days_left"] < 30  # 20-day certificates
    assert not parties["c"]["expiring"]  # rotated for 200 days
    assert not parties["ca"]["expiring"]
    assert any(w.startswith("a: certificate") and "rotate-tls a" in w for w in report["warnings"])
    assert parties["b"]["revoked"]["reason"] == "key-compromise" and parties["b"]["removed"]
    assert parties["a"]["revoked"] is None and parties["c"]["revoked"] is None
    assert any(r["serial"] == format(old_c.serial_number, "x") and r["reason"] == "superseded"
               for r in report["revocations"])
    assert parties["server"]["keys"] == ["TLS key (server/tls.key)",
                                         "CKKS parameters only (he/server.ctx): no key, cannot decrypt"]
    assert any("envelope key" in k for k in parties["a"]["keys"])
    assert any("generated at a site via `keys he-init`" in k for k in parties["a"]["keys"])
    assert report["crl"]["number"] == 2 and report["crl"]["entries"] == 2
    # the text form
    assert main(["keys", "show", "--from", str(prov)]) == 0
    out = capsys.readouterr().out
    assert "REVOKED key-compromise" in out and "warning: a: certificate" in out


def test_show_names_a_dealer_secret(tmp_path: Path) -> None:
    prov = init_federation(tmp_path / "prov", federation="d", server_host="localhost", clients=["a"], he_dealer=True)
    report = show_federation(prov)
    assert any("dealt by this provisioning host" in k for k in report["parties"][2]["keys"])
    assert any("holds the CKKS secret key (dealer mode)" in w for w in report["warnings"])
