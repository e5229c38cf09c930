"""The key management scenario of a federation's life, end to end with real daemons on loopback.

Provisioned without a CKKS dealer (3 sites); the sites start before any CKKS key exists; site_1
makes it (he-init) and seals it to the others; rounds run; site_2's TLS certificate is rotated
(its old one is then refused); site_3 is revoked (refused with the reason; the others finish);
site_1 rotates the CKKS key at a round boundary without site_3 (a ciphertext under the old key is
then refused). Every round's decrypted aggregate equals the plaintext weighted FedAvg of the
sites' updates, and nothing in the server's bundle or state folder can decrypt.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedfms_secure.cli import main
from fedfms_secure.keys import pki
from fedfms_secure.he.ckks import load_context
from fedfms_secure.he.codec import make_site_codec
from fedfms_secure.keys.hestore import HeStore
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.data import synth_federation
from fedfms_secure.demo import _spawn, _stop_all, _wait_for_address
from fedfms_secure.errors import FedFmsError, FederationError
from fedfms_secure.server.store import StateStore
from fedfms_secure.transport.client import FederationClient

ROUNDS = 5
SITES = ["site_1", "site_2", "site_3"]
CLI = [sys.executable, "-m", "fedfms_secure"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def wait_for(what: str, predicate, procs: dict, root: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        for name, proc in procs.items():
            if proc.poll() not in (None, 0) and name != "site_3":
                raise AssertionError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                     + (root / f"{name}.log").read_text()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def server_round(state: Path) -> int:
    try:
        return json.loads((state / "status.json").read_text())["round"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def test_provision_run_rotate_tls_and_he_revoke(tmp_path, provision, capsys):
    data = synth_federation(tmp_path / "data", sites=len(SITES), seed=0, shape=(64, 64, 8))
    keys = provision(tmp_path, SITES, federation="life", rounds=ROUNDS)
    state = tmp_path / "state_server"
    procs: dict[str, subprocess.Popen] = {}

    def start_site(name: str, site: Path) -> None:
        procs[name] = _spawn(
            [*CLI, "client", "--keys", str(keys.bundles[name]), "--server", address, "--data", str(site),
             "--state", str(tmp_path / f"state_{name}"), "--epsilon", "inf", "--save-updates"],
            tmp_path / f"{name}.log", ENV)

    try:
        procs["server"] = _spawn(
            [*CLI, "server", "--keys", str(keys.bundles["server"]), "--address", "127.0.0.1:0", "--state", str(state),
             "--rounds", str(ROUNDS), "--local-epochs", "1", "--exit-when-done"], tmp_path / "server.log", ENV)
        address = _wait_for_address(state, procs["server"], tmp_path / "server.log")
        for name, site in zip(SITES, data):
            start_site(name, site)
        first = keys.he_init("site_1", address)  # the sites are already waiting for their envelopes
        assert (first.key.epoch, first.key.site, first.recipients) == (1, "site_1", ("site_2", "site_3"))
        wait_for("every site to finish round 0", lambda: server_round(state) >= 1 and all(
            (tmp_path / f"state_{name}" / "updates" / "round_0.npz").exists() for name in SITES), procs, tmp_path)

        # site_2 stops (round 1 now waits for it) while its TLS certificate is rotated
        old_bundle = tmp_path / "old_site_2"
        shutil.copytree(keys.bundles["site_2"], old_bundle)
        procs["site_2"].terminate()
        assert procs["site_2"].wait(timeout=60) != 0  # SIGTERM: it stops, to restart with the same --state
        assert main(["keys", "rotate-tls", "site_2", "--from", str(keys.prov), "--out-bundles",
                     str(tmp_path / "bundles"), "--server-bundle", str(keys.bundles["server"])]) == 0
        old_serial = pki.cert_from_pem((old_bundle / "tls.crt").read_bytes(), source="old").serial_number
        new_serial = pki.cert_from_pem((keys.bundles["site_2"] / "tls.crt").read_bytes(), source="new").serial_number
        assert old_serial != new_serial and HeStore(keys.bundles["site_2"]).current() is not None  # he/ kept
        old = load_bundle(old_bundle, role="client")
        with FederationClient.from_bundle(old, address, call_timeout=10) as stale:
            with pytest.raises(FederationError, match="reason: superseded") as info:
                stale.status()
            assert info.value.code == "permission_denied"

        # site_3 is revoked; site_1 rotates the CKKS key at the next round boundary, without site_3
        assert main(["keys", "revoke", "site_3", "--from", str(keys.prov), "--server-bundle",
                     str(keys.bundles["server"])]) == 0
        capsys.readouterr()
        store = HeStore(keys.bundles["site_1"])
        old_key = store.current()
        old_codec = make_site_codec("ckks", store.load(old_key), old_key.fingerprint,
                                    params=load_bundle(keys.bundles["site_1"], role="client").params)
        rotation: dict[str, int] = {}
        rotate = threading.Thread(target=lambda: rotation.update(code=main([
            "keys", "rotate-he", "--keys", str(keys.bundles["site_1"]), "--server", address, "--wait", "120",
            "--crl", str(keys.prov / "ca" / "crl.pem"), "--json"])))
        rotate.start()  # it waits for round 1 (held up by site_2) to close, then publishes at once
        start_site("site_2", data[1])  # with its new certificate
        rotate.join(timeout=180)
        assert rotation == {"code": 0}
        rotated = json.loads(capsys.readouterr().out)
        assert (rotated["epoch"], rotated["site"]) == (2, "site_1") and rotated["round"] >= 2
        assert rotated["recipients"] == ["site_2"] and "site_3" in rotated["skipped"]
        with keys.connect("site_1", address) as client:
            with pytest.raises(FederationError, match="epoch 1 .* was replaced by epoch 2") as info:
                client.commit_weight(client.status().round, old_codec.fingerprint, old_codec.encrypt_scalar(3.0))
            assert info.value.code == "failed_precondition"

        codes = {name: proc.wait(timeout=300) for name, proc in procs.items()}
    finally:
        _stop_all(procs)

    assert codes["server"] == 0 and codes["site_1"] == 0 and codes["site_2"] == 0, codes
    log_3 = (tmp_path / "site_3.log").read_text()
    assert codes["site_3"] != 0 and "was revoked" in log_3 and "reason: key-compromise" in log_3, log_3[-2000:]

    # every site that saw a round decrypted the plaintext weighted FedAvg of its participants, up to
    # the stochastic rounding of the packed encoding (less than one step per summand)
    step = load_bundle(keys.bundles["server"], role="server").params.packing.step
    rounds = StateStore(state).read_records("rounds.jsonl")
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    checked = []
    for record in rounds:
        r, participants = record["round"], record["participants"]
        dumps = {s: tmp_path / f"state_{s}" / "updates" / f"round_{r}.npz" for s in participants}
        if not all(p.exists() for p in dumps.values()):
            continue  # e.g. site_3, revoked after uploading: it never saw the round close
        loaded = {s: np.load(p) for s, p in dumps.items()}
        expected = sum(float(d["weight"]) * d["delta"] for d in loaded.values())
        assert np.abs(expected).max() > 100 * step  # training moved the parameters
        for d in loaded.values():
            np.testing.assert_allclose(d["aggregate"], expected, atol=len(loaded) * step, rtol=0)
        checked.append(r)
    assert {0, rotated["round"], ROUNDS - 1} <= set(checked), (checked, rounds)
    assert "site_3" not in rounds[-1]["participants"]

    # nothing in the server's folders can decrypt
    scan_server_folders([keys.bundles["server"], state], secrets=_site_secrets(tmp_path, keys))


def _site_secrets(root: Path, keys) -> list[bytes]:
    """Every serialized secret context the sites hold (the current epoch's)."""
    secrets = []
    for name in ("site_1", "site_2"):
        store = HeStore(keys.bundles[name])
        secrets.append(store.context_bytes(store.current()))
    assert secrets[0] == secrets[1]  # every site holds the same key
    return secrets


def scan_server_folders(folders: list[Path], secrets: list[bytes]) -> None:
    """Every TenSEAL context found has no secret key; no file or database value holds a site's context."""
    contexts = 0
    values: list[tuple[str, bytes]] = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                values.append((str(path), path.read_bytes()))
    db = sqlite3.connect(folders[1] / "state.db")
    for table, column in (("envelopes", "envelope"), ("state", "value")):
        values += [(f"state.db:{table}", bytes(v) if isinstance(v, bytes) else str(v).encode())
                   for (v,) in db.execute(f"SELECT {column} FROM {table}").fetchall()]
    envelopes = db.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0]
    db.close()
    assert envelopes == 1  # site_2's envelope of epoch 2: sealed, opaque
    for where, data in values:
        for secret in secrets:
            assert secret[64:4096] not in data, f"{where} holds a site's CKKS context"
        try:
            ctx = load_context(data, source=where)
        except FedFmsError:
            continue
        contexts += 1
        assert not ctx.has_secret_key(), f"{where} is a CKKS context WITH the secret key"
    assert contexts >= 1  # the server bundle's params-only ckks.ctx was found and checked
