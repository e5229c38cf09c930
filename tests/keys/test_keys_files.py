"""Key files: modes, passphrase encryption at rest, bundles without a CKKS dealer, envelope keys."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from fedfms_secure.cli import main
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import params_fingerprint
from fedfms_secure.he.ckks import CkksParams
from fedfms_secure.keys.bundle import load_bundle, load_envelope_key
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.lifecycle import rotate_tls
from fedfms_secure.keys.provision import add_client, init_federation
from fedfms_secure.errors import ConfigError, KeyMaterialError

PASS = b"correct horse battery staple"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A federation provisioned through the CLI with --passphrase-file, and its bundles."""
    root = tmp_path_factory.mktemp("locked")
    (root / "pass.txt").write_bytes(PASS + b"\n")
    (root / "wrong.txt").write_bytes(b"not it\n")
    prov = root / "prov"
    assert main(["keys", "init", "--out", str(prov), "--federation", "lk", "--server-host", "localhost",
                 "--clients", "a,b", "--max-sites", "3", "--passphrase-file", str(root / "pass.txt")]) == 0
    out = {"root": root, "prov": prov}
    for role, name in (("server", None), ("client", "a"), ("client", "b")):
        out[name or "server"] = export_bundle(role, name, prov, root / (name or "server"))
    return out


def test_every_private_file_is_0600_and_encrypted(locked: dict[str, Path]) -> None:
    prov = locked["prov"]
    secret = ["ca/ca.key", "server/tls.key"] + [f"clients/{c}/{f}" for c in "ab" for f in ("tls.key", "envelope.key")]
    for rel in secret:
        assert _mode(prov / rel) == 0o600, rel
        assert pki.is_encrypted_pem((prov / rel).read_bytes()), rel
    for rel in ("ca/ca.crt", "server/tls.crt", "he/server.ctx", "federation.json"):
        assert not _mode(prov / rel) & 0o022, rel
    assert not (prov / "he" / "site.ctx").exists()  # no dealer: the provisioning host holds no CKKS secret
    assert json.loads((prov / "federation.json").read_text())["encrypted"] is True
    for name in ("server", "a", "b"):
        bundle = locked[name]
        assert _mode(bundle) == 0o700
        for file in bundle.iterdir():
            private = file.name in ("tls.key", "envelope.key")
            assert (_mode(file) == 0o600) if private else not _mode(file) & 0o022, file


def test_passphrase_protected_keys_load_only_with_their_passphrase(locked: dict[str, Path]) -> None:
    root = locked["root"]
    for name, role in (("server", "server"), ("a", "client")):
        with pytest.raises(KeyMaterialError, match=rf"{locked[name] / 'tls.key'} is encrypted.*--passphrase-file"):
            load_bundle(locked[name], role=role)
        with pytest.raises(KeyMaterialError, match=rf"wrong passphrase for {locked[name] / 'tls.key'}"):
            load_bundle(locked[name], role=role, passphrase=b"not it")
        bundle = load_bundle(locked[name], role=role, passphrase=PASS)
        # decrypted in memory for gRPC, still encrypted on disk
        assert b"-----BEGIN PRIVATE KEY-----" in bundle.key_pem
        assert pki.is_encrypted_pem((locked[name] / "tls.key").read_bytes())
    with pytest.raises(KeyMaterialError, match=r"envelope.key is encrypted"):
        load_envelope_key(locked["a"])
    with pytest.raises(KeyMaterialError, match=r"wrong passphrase for .*envelope.key"):
        load_envelope_key(locked["a"], passphrase=b"nope")
    key = load_envelope_key(locked["a"], passphrase=pki.read_passphrase(root / "pass.txt"))
    assert isinstance(key, x25519.X25519PrivateKey)
    assert load_bundle(locked["a"], role="client", passphrase=PASS).envelope_keys["a"] == pki.raw_public(key)
    # the CA key too: changing the federation needs the passphrase
    with pytest.raises(KeyMaterialError, match=r"ca.key is encrypted"):
        add_client(locked["prov"], "c")
    assert main(["keys", "add-client", "c", "--from", str(locked["prov"]),
                 "--passphrase-file", str(root / "wrong.txt")]) == 1
    assert not (locked["prov"] / "clients" / "c").exists()


def test_passphrase_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match=rf"passphrase file {tmp_path / 'none'} does not exist"):
        pki.read_passphrase(tmp_path / "none")
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(KeyMaterialError, match=rf"passphrase file {tmp_path / 'empty'} is empty"):
        pki.read_passphrase(tmp_path / "empty")
    assert pki.read_passphrase(None) is None


def test_server_daemon_reads_passphrase_file(locked: dict[str, Path]) -> None:
    """`server --passphrase-file` (config key passphrase_file) opens the encrypted bundle."""
    from fedfms_secure.config import ServerConfig, load_config
    from fedfms_secure.server.daemon import build_coordinator

    root = locked["root"]
    (root / "server.toml").write_text(f'keys = "{locked["server"]}"\nstate = "{root / "st"}"\n'
                                      f'passphrase_file = "{root / "pass.txt"}"\n')
    config = load_config(ServerConfig, root / "server.toml", {})
    assert config.passphrase_file == root / "pass.txt"
    _, bundle, _ = build_coordinator(config)
    assert bundle.name == "server"
    wrong = load_config(ServerConfig, root / "server.toml", {"passphrase_file": root / "wrong.txt"})
    with pytest.raises(KeyMaterialError, match="wrong passphrase for .*tls.key"):
        build_coordinator(wrong)


def test_bundles_without_a_dealer(locked: dict[str, Path]) -> None:
    server = json.loads((locked["server"] / "manifest.json").read_text())
    site = json.loads((locked["a"] / "manifest.json").read_text())
    params = CkksParams.from_dict(server["ckks"]["params"])
    for manifest in (server, site):
        assert manifest["ckks"]["source"] == "site" and manifest["ckks"]["has_secret_key"] is False
        assert manifest["ckks"]["params_fingerprint"] == params_fingerprint(params)
        assert "fingerprint" not in manifest["ckks"]
        assert set(manifest["envelope_keys"]) == {"a", "b"}
        assert all(len(v) == 64 for v in manifest["envelope_keys"].values())
    assert sorted(p.name for p in locked["a"].iterdir()) == ["ca.crt", "envelope.key", "manifest.json", "peers",
                                                            "tls.crt", "tls.key"]
    assert sorted(p.name for p in (locked["a"] / "peers").iterdir()) == ["b.crt"]
    b = load_bundle(locked["a"], role="client", passphrase=PASS)
    assert not b.has_he_secret and b.context_bytes is None and b.fingerprint is None and b.he_source == "site"
    with pytest.raises(KeyMaterialError, match="holds no CKKS context.*keys he-init"):
        b.context()
    s = load_bundle(locked["server"], role="server", passphrase=PASS)
    assert not s.context().has_secret_key() and s.fingerprint is None
    # the CA certifies each site's envelope key in its certificate
    assert pki.envelope_key_of(pki.cert_from_pem(b.cert_pem, source="a")) == b.envelope_keys["a"]


def test_envelope_key_swap_is_refused(tmp_path: Path) -> None:
    prov = init_federation(tmp_path / "p", federation="e", server_host="localhost", clients=["a", "b"],
                           he_dealer=False)
    a = export_bundle("client", "a", prov, tmp_path / "a")
    b_key = (prov / "clients" / "b" / "envelope.key").read_bytes()
    pki.write_private(a / "envelope.key", b_key)
    manifest = json.loads((a / "manifest.json").read_text())
    import hashlib

    manifest["files"]["envelope.key"] = hashlib.sha256(b_key).hexdigest()
    (a / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KeyMaterialError, match=r"envelope.key is not the envelope key .* lists for site 'a'"):
        load_bundle(a, role="client")
    with pytest.raises(KeyMaterialError, match=r"envelope.key is not the envelope key"):
        load_envelope_key(a)
    os.chmod(a / "envelope.key", 0o640)
    with pytest.raises(KeyMaterialError, match=r"envelope.key is a private file readable by others \(mode 640\)"):
        load_envelope_key(a)


def test_lifetimes_and_rotation_keep_modes(tmp_path: Path) -> None:
    prov = init_federation(tmp_path / "p", federation="d", server_host="localhost", clients=["a"], days=30,
                           ca_days=400, he_dealer=False)
    ca, leaf = pki.load_cert(prov / "ca" / "ca.crt"), pki.load_cert(prov / "clients" / "a" / "tls.crt")
    assert 399 <= (ca.not_valid_after_utc - ca.not_valid_before_utc).days <= 401
    assert 29 <= (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 31
    default = init_federation(tmp_path / "q", federation="d", server_host="localhost", clients=["a"], he_dealer=False)
    ca = pki.load_cert(default / "ca" / "ca.crt")
    assert 3649 <= (ca.not_valid_after_utc - ca.not_valid_before_utc).days <= 3651  # 10 years
    leaf = pki.load_cert(default / "server" / "tls.crt")
    assert 364 <= (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 366  # 1 year
    assert rotate_tls(prov, None, server=True, days=10) == ["a", "server"]
    for rel in ("server/tls.key", "clients/a/tls.key", "clients/a/envelope.key", "ca/ca.key"):
        assert _mode(prov / rel) == 0o600, rel
    assert not _mode(prov / "ca" / "crl.pem") & 0o022
    with pytest.raises(ConfigError, match="at least 1 day"):
        init_federation(tmp_path / "r", federation="d", server_host="localhost", clients=["a"], days=0)


def test_add_client_refuses_what_the_packing_cannot_hold(tmp_path: Path, capsys) -> None:
    prov = tmp_path / "p"
    assert main(["keys", "init", "--out", str(prov), "--server-host", "localhost", "--clients", "a,b"]) == 0
    assert "room for 2 site(s) in all (--max-sites): `keys add-client` cannot add any" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"cannot add 'c': this federation was provisioned with room for 2 site\(s\) "
                                          r"\(`keys init --max-sites`.*at most 2 sites x 10 rounds.*--max-sites N"):
        add_client(prov, "c")
    roomy = tmp_path / "roomy"
    assert main(["keys", "init", "--out", str(roomy), "--server-host", "localhost", "--clients", "a,b",
                 "--max-sites", "3"]) == 0
    assert "`keys add-client` can add 1 more" in capsys.readouterr().out
    add_client(roomy, "c")
    with pytest.raises(ConfigError, match=r"cannot add 'd'.*at most 3 sites"):
        add_client(roomy, "d")
    with pytest.raises(ConfigError, match="already a site"):
        add_client(prov, "a")
    legacy = tmp_path / "legacy"  # one value per slot: no packing limit
    assert main(["keys", "init", "--out", str(legacy), "--server-host", "localhost", "--clients", "a",
                 "--legacy-ckks"]) == 0
    assert main(["keys", "add-client", "b", "--from", str(legacy), "--out-bundle", str(tmp_path / "b")]) == 0
    b = load_bundle(tmp_path / "b", role="client")
    assert b.clients == ("a", "b") and set(b.envelope_keys) == {"a", "b"}


def test_every_keys_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("init", "export", "add-client", "revoke", "rotate-tls", "show", "verify"):
        with pytest.raises(SystemExit) as exit_:
            main(["keys", action, "--help"])
        assert exit_.value.code == 0
        assert "usage: fedfms-secure keys " + action in capsys.readouterr().out


def test_missing_or_corrupt_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "show", "--from", str(tmp_path / "nowhere")]) == 1
    assert f"{tmp_path / 'nowhere' / 'federation.json'} does not exist" in capsys.readouterr().err
    prov = init_federation(tmp_path / "p", federation="c", server_host="localhost", clients=["a"], he_dealer=False)
    (prov / "ca" / "ca.key").write_bytes(b"junk")
    assert main(["keys", "rotate-tls", "a", "--from", str(prov)]) == 1
    assert f"{prov / 'ca' / 'ca.key'} is not a PEM private key" in capsys.readouterr().err
    (prov / "clients" / "a" / "envelope.key").unlink()
    assert main(["keys", "export", "client", "a", "--from", str(prov), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert f"{prov / 'clients' / 'a' / 'envelope.key'} is missing" in err and "restore it" in err
    (prov / "federation.json").write_text("{not json")
    assert main(["keys", "show", "--from", str(prov)]) == 1
    assert "federation.json is unreadable or not JSON" in capsys.readouterr().err


def test_export_update_rewrites_in_place_and_keeps_the_sites_files(tmp_path: Path) -> None:
    prov = init_federation(tmp_path / "p", federation="u", server_host="localhost", clients=["a", "b"],
                           he_dealer=False)
    a = export_bundle("client", "a", prov, tmp_path / "a")
    (a / "he").mkdir(mode=0o700)
    pki.write_private(a / "he" / "epoch-1.ctx", b"kept by the site")
    old_serial = load_bundle(a, role="client").cert_pem
    with pytest.raises(KeyMaterialError, match="use another --out"):
        export_bundle("client", "a", prov, a)  # without --update an existing bundle is never overwritten
    rotate_tls(prov, ["a"])
    with pytest.raises(KeyMaterialError, match=r"does not hold a client bundle of 'b'.*--update only rewrites"):
        export_bundle("client", "b", prov, a, update=True)
    export_bundle("client", "a", prov, a, update=True)
    assert (a / "he" / "epoch-1.ctx").read_bytes() == b"kept by the site"
    assert load_bundle(a, role="client").cert_pem != old_serial
