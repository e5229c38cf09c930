"""Envelope keys made at the sites (`keys envelope-key`): the provisioning host certifies the public
key and never holds the private one, so it cannot open the CKKS key sealed to that site, not even
with the envelopes from the server's state.db. The sealed key still reaches the site through a
real server (mutual TLS) and opens there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from federation_kit import running_server, site_client
from cryptography.hazmat.primitives import serialization

from fedfms_secure.cli import main
from fedfms_secure.site.hekeys import Keyring, init_key
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.lifecycle import rotate_tls
from fedfms_secure.keys.provision import add_client
from fedfms_secure.errors import ConfigError, KeyMaterialError


def _envelope_key(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, bytes]:
    folder.mkdir()
    assert main(["keys", "envelope-key", "--out", str(folder / "envelope.key"), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert oct((folder / "envelope.key").stat().st_mode & 0o777) == "0o600"
    return folder / "envelope.key", bytes.fromhex(made["public_key"])


def _files_holding(folder: Path, key_file: Path) -> list[Path]:
    """Every file under ``folder`` whose bytes contain the X25519 private key of ``key_file``: its
    raw 32 bytes, its PKCS#8 DER or its PEM (so also inside a database or another file)."""
    key = pki.envelope_key_from_pem(key_file.read_bytes(), source=str(key_file))
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pem_body = b"".join(key_file.read_bytes().splitlines()[1:-1])
    return sorted(f for f in folder.rglob("*") if f.is_file()
                  and any(needle in f.read_bytes() for needle in (raw, der, pem_body)))


def test_a_site_made_envelope_key_never_reaches_the_provisioning_host(tmp_path: Path, capsys) -> None:
    key_a, public_a = _envelope_key(tmp_path / "at_a", capsys)
    prov = tmp_path / "prov"
    assert main(["keys", "init", "--out", str(prov), "--federation", "se", "--server-host", "localhost",
                 "--clients", "a,b", "--max-sites", "3", "--envelope-public", f"a={key_a}.pub"]) == 0
    capsys.readouterr()
    meta = json.loads((prov / "federation.json").read_text())
    assert meta["site_envelope_keys"] == ["a"] and meta["envelope_keys"]["a"] == public_a.hex()
    assert not (prov / "clients" / "a" / "envelope.key").exists() and (prov / "clients" / "b" / "envelope.key").exists()
    assert pki.envelope_key_of(pki.load_cert(prov / "clients" / "a" / "tls.crt")) == public_a  # certified
    assert main(["keys", "show", "--from", str(prov), "--json"]) == 0
    parties = {p["party"]: p for p in json.loads(capsys.readouterr().out)["parties"]}
    assert any("made at the site" in k for k in parties["a"]["keys"])
    assert not any("made at the site" in k for k in parties["b"]["keys"])

    server = export_bundle("server", None, prov, tmp_path / "server")
    bundle_a = export_bundle("client", "a", prov, tmp_path / "bundle_a")
    bundle_b = export_bundle("client", "b", prov, tmp_path / "bundle_b")
    assert not (bundle_a / "envelope.key").exists()
    with pytest.raises(KeyMaterialError, match="made its envelope key itself.*copy that key file here"):
        load_bundle(bundle_a, role="client")
    assert main(["keys", "verify", str(bundle_a)]) == 1
    assert "keys envelope-key" in capsys.readouterr().out
    shutil.copy2(key_a, bundle_a / "envelope.key")
    assert load_bundle(bundle_a, role="client").envelope_keys["a"] == public_a
    assert main(["keys", "verify", str(bundle_a)]) == 0
    capsys.readouterr()
    # another key in its place is refused: it is checked against the certified public key
    other = tmp_path / "other"
    _envelope_key(other, capsys)
    wrong = tmp_path / "bundle_wrong"
    shutil.copytree(bundle_a, wrong)
    shutil.copy2(other / "envelope.key", wrong / "envelope.key")
    with pytest.raises(KeyMaterialError, match="is not the envelope key"):
        load_bundle(wrong, role="client")
    manifest = json.loads((wrong / "manifest.json").read_text())
    (wrong / "manifest.json").write_text(json.dumps({**manifest, "envelope_key_source": ["site"]}))
    with pytest.raises(KeyMaterialError, match="envelope_key_source"):
        load_bundle(wrong, role="client")

    # b makes the CKKS key and seals it to a through a real server; a opens it
    with running_server(server, tmp_path / "state", rounds=1) as address:
        with site_client(address, bundle_b) as client_b:
            published = init_key(client_b, load_bundle(bundle_b, role="client"))
        with site_client(address, bundle_a) as client_a:
            ring = Keyring(client_a, load_bundle(bundle_a, role="client"), timeout=30)
            ring.sync(client_a.status().key)
            assert published.recipients == ("a",) and ring.fingerprint == published.key.fingerprint
    # nothing the provisioning host or the server keeps is a's envelope private key
    assert _files_holding(prov, key_a) == []
    assert _files_holding(tmp_path / "state", key_a) == []
    assert _files_holding(bundle_a, key_a) == [bundle_a / "envelope.key"]  # the search does find it
    # whereas the host made b's: it holds it, the way this test would catch
    assert _files_holding(prov, bundle_b / "envelope.key") == [prov / "clients" / "b" / "envelope.key"]

    # a rotated certificate certifies the same key, and --update keeps the site's file in the bundle
    rotate_tls(prov, ["a"])
    export_bundle("client", "a", prov, bundle_a, update=True)
    assert (bundle_a / "envelope.key").read_bytes() == key_a.read_bytes()
    assert load_bundle(bundle_a, role="client").envelope_keys["a"] == public_a

    # a site added later with its own key
    key_c, public_c = _envelope_key(tmp_path / "at_c", capsys)
    assert main(["keys", "add-client", "c", "--from", str(prov), "--envelope-public", f"{key_c}.pub"]) == 0
    assert not (prov / "clients" / "c" / "envelope.key").exists()
    assert json.loads((prov / "federation.json").read_text())["site_envelope_keys"] == ["a", "c"]


def test_bad_envelope_public_keys_are_refused_with_what_to_do(tmp_path: Path, capsys) -> None:
    (tmp_path / "short.pub").write_text("abcd\n")
    (tmp_path / "junk.pub").write_text("not hex at all\n")
    base = ["keys", "init", "--server-host", "localhost", "--clients", "a,b"]
    for i, (arg, message) in enumerate([
        (f"a={tmp_path / 'short.pub'}", "not a raw X25519 public key"),
        (f"a={tmp_path / 'junk.pub'}", "is not a .pub file"),
        (f"a={tmp_path / 'missing.pub'}", "does not exist"),
        (f"zed={tmp_path / 'short.pub'}", "not a raw X25519 public key"),
        ("a", "write NAME=FILE"),
    ]):
        out = tmp_path / f"prov{i}"
        assert main([*base, "--out", str(out), "--envelope-public", arg]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()
    key, _ = _envelope_key(tmp_path / "at_zed", capsys)
    from fedfms_secure.keys.provision import init_federation

    with pytest.raises(ConfigError, match="zed, which are not in the client list"):
        init_federation(tmp_path / "p", federation="x", server_host="localhost", clients=["a"],
                        envelope_publics={"zed": pki.raw_public(pki.new_envelope_key())})
    with pytest.raises(ConfigError, match="low-order point"):  # no shared secret: he-init would fail for all
        init_federation(tmp_path / "p", federation="x", server_host="localhost", clients=["a"],
                        envelope_publics={"a": bytes(32)})
    same = pki.raw_public(pki.new_envelope_key())
    with pytest.raises(ConfigError, match="the same envelope public key"):
        init_federation(tmp_path / "p", federation="x", server_host="localhost", clients=["a", "b"],
                        envelope_publics={"a": same, "b": same})
    assert not (tmp_path / "p").exists()
    # an existing key is never overwritten
    assert main(["keys", "envelope-key", "--out", str(key)]) == 1
    assert "never overwritten" in capsys.readouterr().err
    prov = tmp_path / "prov_ok"
    assert main([*base, "--out", str(prov), "--max-sites", "3"]) == 0
    assert add_client(prov, "c") == prov / "clients" / "c"  # the host-made default still works
    assert (prov / "clients" / "c" / "envelope.key").exists()
