"""End to end: real server and site processes on loopback, mutual TLS, DP-SGD, CKKS; 2 sites, 2 rounds."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from fedfms_secure.he.codec import make_site_codec, make_aggregator
from fedfms_secure.keys.hestore import site_key
from fedfms_secure.errors import FedFmsError
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.demo import DemoOptions, run_demo
from fedfms_secure.privacy.budget import read_ledger
from fedfms_secure.server.store import StateStore
from fedfms_secure.site.metrics import METRICS_FILE, read_metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    options = DemoOptions(out=out, clients=2, rounds=2, epsilon=50.0, he=True, save_updates=True, timeout=900)
    report = run_demo(options)
    return out, report


def test_state_and_data_are_private_to_their_user(run):
    """Server and site state (patient-derived caches, splits, scores, models, ciphertexts) and the
    demo's data: folders 0700, files 0600, never readable by other local users."""
    out, _ = run
    checked = 0
    for root in (out / "run" / "server", out / "run" / "site_1", out / "run" / "site_2", out / "data"):
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                continue
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode & 0o777)}"
            checked += 1
    assert checked > 20


def test_report_has_every_round(run):
    out, report = run
    on_disk = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2]
    for row in on_disk["rounds"]:
        for key in ("round", "dice_mean", "epsilon_max", "bytes_up_total", "bytes_down_total", "seconds"):
            assert key in row
        assert row["sites_reporting"] == 2
        assert row["bytes_up_total"] > 0
    assert (out / "report.png").stat().st_size > 1000


def test_server_never_held_a_secret_key(run):
    out, _ = run
    server = load_bundle(out / "run" / "bundles" / "server", role="server")
    context = server.context()
    assert not context.is_private()
    # the context the server ran with cannot decrypt the global state it built
    store = StateStore(out / "run" / "server")
    row = store.global_row(2)
    stored = list(store.iter_global(row))
    make_aggregator("ckks", context, server.fingerprint, params=server.params).parse(stored[0])  # it can add them
    with pytest.raises(FedFmsError):
        make_site_codec("ckks", context, server.fingerprint, params=server.params).decrypt_vector(stored, row.vector_length)
    # while every site can, with the key made at site_1 and sealed to the others
    fingerprints = set()
    for name in ("site_1", "site_2"):
        site = load_bundle(out / "run" / "bundles" / name, role="client")
        assert not site.has_he_secret  # the provisioning host made no CKKS secret key
        key = site_key(site)
        codec = make_site_codec("ckks", key.context, key.fingerprint, params=site.params)
        assert codec.decrypt_vector(stored, row.vector_length).size == row.vector_length
        fingerprints.add(key.fingerprint)
    assert len(fingerprints) == 1 and StateStore(out / "run" / "server").key_epochs()[0].site == "site_1"
    # nothing the server wrote can decrypt: its folder holds ciphertexts and JSON records only
    files = [p for p in (out / "run" / "server").rglob("*") if p.is_file() and p.parent.parent.name != "blobs"]
    names = {p.suffix for p in files if p.parent.name != "packs"}
    assert names <= {".db", ".db-wal", ".db-shm", ".json", ".jsonl", ".lock"}, names
    assert {p.suffix for p in files if p.parent.name == "packs"} == {".pack"}  # ciphertexts, as in blobs/
    lock = (out / "run" / "server" / "daemon.lock").read_text()  # the one-server-per-folder lock: a PID only
    assert lock.strip().isdigit(), lock


def test_sites_decrypt_the_plaintext_weighted_fedavg(run):
    out, _ = run
    packing = json.loads((out / "run" / "bundles" / "site_1" / "manifest.json").read_text())["ckks"]["params"]["packing"]
    step = packing["bound"] / 2 ** packing["quant_bits"]
    assert packing["noise_std"] > 0 and step / 2 <= 0.01 * packing["noise_std"]  # sized to the DP noise
    for round_ in range(2):
        dumps = [np.load(out / "run" / site / "updates" / f"round_{round_}.npz") for site in ("site_1", "site_2")]
        counts = [int(d["n"]) for d in dumps]
        expected = sum(n / sum(counts) * d["delta"] for n, d in zip(counts, dumps))
        assert np.abs(expected).max() > 1e-4  # training moved the parameters
        for d in dumps:
            # stochastic rounding: less than one quantisation step per summed upload
            np.testing.assert_allclose(d["aggregate"], expected, atol=len(dumps) * step, rtol=0)
            assert np.abs(d["aggregate"] - expected).max() > 0  # the uploads were quantised


def test_training_improves_dice_and_epsilon_grows(run):
    out, report = run
    assert report["rounds"][-1]["dice_mean"] > report["dice_initial"]
    for site in report["sites"]:
        eps = [row["epsilon"][site] for row in report["rounds"]]
        assert 0 < eps[0] < eps[1] <= 50.0
        # the site's own ledger holds the same cumulative epsilon as its reports
        assert [r["epsilon"] for r in read_ledger(out / "run" / site)] == pytest.approx(eps)


def test_scores_stay_at_the_sites(run):
    """The server's metrics.jsonl holds who reported, contributed and bytes, and no score; each
    site's own STATE/metrics.jsonl (mode 0600) holds its scores, and the report is built from those."""
    out, report = run
    server = StateStore(out / "run" / "server").read_records("metrics.jsonl")
    assert sorted((m["site"], m["round"]) for m in server) == [(s, r) for s in ("site_1", "site_2") for r in (0, 1)]
    for record in server:
        assert set(record) == {"site", "round", "time", "contributed", "bytes_up", "bytes_down"}, record
        assert record["contributed"] == 1.0 and record["bytes_up"] > 0
    text = (out / "run" / "server" / "metrics.jsonl").read_text()
    for word in ("dice", "iou", "hd95", "loss", "epsilon"):
        assert word not in text
    for site in ("site_1", "site_2"):
        path = out / "run" / site / METRICS_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        records = read_metrics(out / "run" / site)
        assert [r["round"] for r in records] == [0, 1]
        ledger = read_ledger(out / "run" / site)
        for record, entry, row in zip(records, ledger, report["rounds"], strict=True):
            for key in ("dice", "dice_std", "iou", "iou_std", "hd95", "hd95_std", "dice_local"):
                assert isinstance(record[key], float), key
            assert record["epsilon"] == pytest.approx(entry["epsilon"]) and record["epsilon_unit"] == "patient"
            assert record["contributed"] == 1.0
            assert row["dice"][site] == record["dice"]  # the report's table comes from the site's own file
        assert report["final"]["sites"][site]["dice_mean"] == records[-1]["dice"]
