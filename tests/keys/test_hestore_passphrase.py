"""A site's CKKS contexts encrypted at rest in a passphrase-protected bundle (real TenSEAL contexts,
real bundles, real gRPC for the he-init / rotate-he / site daemon path)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from fedfms_secure.cli import main
from fedfms_secure.site.hekeys import Keyring
from fedfms_secure.config import ServerConfig
from fedfms_secure.keys import pki
from fedfms_secure.he.ckks import load_context, new_secret_context, serialize_site_context
from fedfms_secure.keys.hestore import MAGIC, HeStore, site_key
from fedfms_secure.keys.keycheck import verify_bundle
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.he.packing import fit_params
from fedfms_secure.errors import KeyMaterialError
from fedfms_secure.server.daemon import serve
from fedfms_secure.transport.client import FederationClient

PARAMS = fit_params(bound=1.0, sites=2, rounds=3)
PASS = b"correct horse battery"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hepass")
    out: dict[str, Path] = {"root": root}
    for mode, passphrase in (("encrypted", PASS), ("plain", None)):
        prov = init_federation(root / f"prov-{mode}", federation="hp", server_host="localhost", clients=["a", "b"],
                               params=PARAMS, passphrase=passphrase, he_dealer=False)
        out[f"prov-{mode}"] = prov
        out[mode] = export_bundle("client", "a", prov, root / f"a-{mode}")
    return out


@pytest.fixture
def bundle(bundles: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundles["encrypted"], tmp_path / "a"))


def fresh() -> tuple[bytes, bytes]:
    """A serialized site context and the serialized bytes of its secret key alone."""
    ctx = new_secret_context(PARAMS)
    with tempfile.TemporaryDirectory() as tmp:
        ctx.secret_key().data.save(str(Path(tmp) / "sk"))
        secret = (Path(tmp) / "sk").read_bytes()
    data = serialize_site_context(ctx)
    assert secret in data  # the check below means something: the plain context holds these bytes
    return data, secret


def _problems(report: dict) -> str:
    return " | ".join(f"{p['file']}: {p['problem']}" for p in report["problems"])


def test_an_encrypted_bundle_keeps_its_contexts_encrypted_and_reads_them_back(bundle: Path) -> None:
    data, secret = fresh()
    store = HeStore(bundle, passphrase=PASS)
    assert store.protected and store.encrypts
    key = store.put(1, data)
    raw = key.path.read_bytes()
    assert raw.startswith(MAGIC) and store.is_encrypted(key)
    assert secret not in raw and data[4096:4160] not in raw
    assert oct(key.path.stat().st_mode & 0o777) == "0o600"
    # nothing in he/ (temporary files included) holds the plaintext
    assert all(secret not in f.read_bytes() for f in store.folder.iterdir())
    # a new store (no cached key) reads it back, and the site uses it
    assert HeStore(bundle, passphrase=PASS).context_bytes(key) == data
    held = site_key(load_bundle(bundle, role="client", passphrase=PASS), passphrase=PASS)
    assert (held.epoch, held.fingerprint) == (1, key.fingerprint) and held.context.has_secret_key()
    # a rotation's pending key is encrypted too, with its own salt and nonce
    data2, secret2 = fresh()
    pending = store.put(2, data2, pending=True)
    raw2 = pending.path.read_bytes()
    header = slice(len(MAGIC), len(MAGIC) + 1 + 16 + 12)  # version, salt, nonce
    assert raw2.startswith(MAGIC) and secret2 not in raw2 and raw2[header] != raw[header]
    assert store.load(store.promote(pending.fingerprint)).has_secret_key()


def test_a_missing_or_wrong_passphrase_names_the_file(bundle: Path) -> None:
    data, _ = fresh()
    key = HeStore(bundle, passphrase=PASS).put(1, data)
    where = re.escape(str(key.path))
    with pytest.raises(KeyMaterialError, match=rf"{where} \(CKKS key epoch 1\) is encrypted .*`--passphrase-file`"):
        HeStore(bundle).load(key)
    with pytest.raises(KeyMaterialError, match=rf"{where} \(CKKS key epoch 1\) cannot be decrypted: the passphrase is "
                                               r"wrong.*`--passphrase-file`"):
        HeStore(bundle, passphrase=b"wrong").load(key)
    # writing into a protected bundle without the passphrase would leave a key in the clear: refused
    before = key.path.read_bytes()
    with pytest.raises(KeyMaterialError, match=rf"{re.escape(str(bundle / 'tls.key'))} is encrypted.*--passphrase-file"):
        HeStore(bundle).put(2, fresh()[0])
    assert key.path.read_bytes() == before and not (bundle / "he" / "epoch-2.ctx").exists()


@pytest.mark.parametrize("where", ["magic", "version", "salt", "nonce", "ciphertext", "tag", "truncated"])
def test_a_tampered_file_is_refused(bundle: Path, where: str) -> None:
    store = HeStore(bundle, passphrase=PASS)
    key = store.put(1, fresh()[0])
    raw = bytearray(key.path.read_bytes())
    at = {"magic": 0, "version": len(MAGIC), "salt": len(MAGIC) + 5, "nonce": len(MAGIC) + 20,
          "ciphertext": len(raw) // 2, "tag": len(raw) - 1}
    if where == "truncated":
        raw = raw[:len(MAGIC) + 40]
    else:
        raw[at[where]] ^= 0x01
    key.path.write_bytes(bytes(raw))
    expected = {"magic": "is not a valid TenSEAL CKKS context", "version": "format version 0, this build reads version 1",
                "truncated": "truncated encrypted CKKS context"}.get(where, "cannot be decrypted")
    with pytest.raises(KeyMaterialError, match=rf"{re.escape(str(key.path))}.*{expected}"):
        HeStore(bundle, passphrase=PASS).load(key)


def test_a_context_moved_to_another_epochs_file_is_refused(bundle: Path) -> None:
    store = HeStore(bundle, passphrase=PASS)
    first = store.put(1, fresh()[0])
    first_raw = first.path.read_bytes()
    pending = store.put(2, fresh()[0], pending=True)
    pending.path.write_bytes(first_raw)  # the file's role (its epoch) is bound: no swap goes unnoticed
    with pytest.raises(KeyMaterialError, match=rf"{re.escape(str(pending.path))}.*cannot be decrypted"):
        store.load(pending)


def test_a_plain_bundle_keeps_plain_files_and_an_old_plain_file_is_still_read(bundles: dict[str, Path],
                                                                             bundle: Path, tmp_path: Path) -> None:
    plain = Path(shutil.copytree(bundles["plain"], tmp_path / "plain"))
    data, _ = fresh()
    store = HeStore(plain, passphrase=PASS)  # a passphrase, but nothing in this bundle is encrypted
    assert not store.protected and not store.encrypts
    key = store.put(1, data)
    assert key.path.read_bytes() == data and not store.is_encrypted(key)
    assert HeStore(plain).context_bytes(key) == data
    assert oct(key.path.stat().st_mode & 0o777) == "0o600"
    assert verify_bundle(plain)["ok"]
    # a context written in the clear before the bundle's contexts were encrypted keeps working
    shutil.copytree(plain / "he", bundle / "he")
    assert HeStore(bundle, passphrase=PASS).context_bytes(key) == data
    report = verify_bundle(bundle, passphrase=PASS)
    assert report["ok"], _problems(report)
    assert any("epoch-1.ctx: stored in the clear although tls.key is encrypted" in n for n in report["notes"])


def test_keys_verify_opens_encrypted_contexts_with_the_passphrase(bundle: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    key = HeStore(bundle, passphrase=PASS).put(1, fresh()[0])
    (tmp_path / "pass").write_bytes(PASS + b"\n")
    rc = main(["keys", "verify", str(bundle), "--json", "--passphrase-file", str(tmp_path / "pass")])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"], _problems(report)
    assert any(n == f"{key.path}: encrypted at rest with the bundle's passphrase" for n in report["notes"])
    assert any("CKKS key epoch 1" in n for n in report["notes"])
    # without the passphrase: reported as encrypted, not as damaged (only the unchecked PEM keys are problems)
    report = verify_bundle(bundle)
    assert {Path(p["file"]).name for p in report["problems"]} == {"tls.key", "envelope.key"}, _problems(report)
    assert any(n.startswith(f"{key.path}: CKKS key epoch 1, encrypted with the bundle's passphrase; give it with "
                            "--passphrase-file") for n in report["notes"])
    # a damaged encrypted context is a problem when the passphrase is given
    raw = bytearray(key.path.read_bytes())
    raw[-5] ^= 0xFF
    key.path.write_bytes(bytes(raw))
    report = verify_bundle(bundle, passphrase=PASS)
    assert not report["ok"] and f"{key.path}: {key.path} (CKKS key epoch 1) cannot be decrypted" in _problems(report)
    assert all("--passphrase-file" in p["fix"] for p in report["problems"])


def test_he_init_rotate_he_and_the_site_daemon_keep_contexts_encrypted(bundles: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    prov = bundles["prov-encrypted"]
    export_bundle("server", None, prov, tmp_path / "server")
    sites = {name: export_bundle("client", name, prov, tmp_path / name) for name in ("a", "b")}
    pass_file = tmp_path / "pass"
    pass_file.write_bytes(PASS + b"\n")
    stop = threading.Event()
    config = ServerConfig(keys=tmp_path / "server", state=tmp_path / "state", address="127.0.0.1:0", rounds=2,
                          passphrase_file=pass_file)
    thread = threading.Thread(target=serve, args=(config, stop), daemon=True)
    thread.start()
    address_file = tmp_path / "state" / "address.json"
    for _ in range(400):
        if address_file.exists():
            break
        threading.Event().wait(0.05)
    address = json.loads(address_file.read_text())["address"]
    a, b = (load_bundle(sites[name], role="client", passphrase=PASS) for name in ("a", "b"))
    client, client_a = (FederationClient.from_bundle(x, address, call_timeout=20) for x in (b, a))
    try:
        assert main(["keys", "he-init", "--keys", str(sites["a"]), "--server", address, "--passphrase-file",
                     str(pass_file), "--json"]) == 0
        made = json.loads(capsys.readouterr().out)
        assert HeStore(sites["a"], passphrase=PASS).is_encrypted(HeStore(sites["a"]).current())
        ring = Keyring(client, b, passphrase=PASS, timeout=20)  # the site daemon's key store
        assert ring.sync(client.status().key) and ring.fingerprint == made["fingerprint"]
        store_b = HeStore(sites["b"], passphrase=PASS)
        assert store_b.is_encrypted(store_b.current())
        with pytest.raises(KeyMaterialError, match=r"epoch-1.ctx \(CKKS key epoch 1\) is encrypted"):
            Keyring(client, b, timeout=1)  # a daemon started without its passphrase cannot use the key

        assert main(["keys", "rotate-he", "--keys", str(sites["b"]), "--server", address, "--passphrase-file",
                     str(pass_file), "--wait", "20", "--json"]) == 0
        rotated = json.loads(capsys.readouterr().out)
        current = store_b.current()
        assert (current.epoch, current.fingerprint) == (2, rotated["fingerprint"]) and store_b.is_encrypted(current)
        assert sorted(p.name for p in store_b.folder.glob("epoch-*.ctx")) == ["epoch-2.ctx"]
        ring_a = Keyring(client_a, a, passphrase=PASS, timeout=20)  # site a follows the rotation
        assert ring_a.fingerprint == made["fingerprint"]
        assert ring_a.sync(client_a.status().key) and ring_a.fingerprint == rotated["fingerprint"]
        store_a = HeStore(sites["a"], passphrase=PASS)
        assert store_a.current().epoch == 2 and store_a.is_encrypted(store_a.current())
        assert load_context(store_a.context_bytes(store_a.current()), source="test").has_secret_key()
        assert pki.is_encrypted_pem((sites["a"] / "tls.key").read_bytes())
    finally:
        client.close()
        client_a.close()
        stop.set()
        thread.join(timeout=10)
