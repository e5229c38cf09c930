"""The server remembers which rounds took each site's upload, across restarts, and tells the site
at join; the server process never imports torch."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from fedfms_secure.he.codec import make_site_codec
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.protocol import Chunk
from fedfms_secure.server.plan_sizes import plan_vector_length

from federation_kit import provision_sites, running_server, site_client

SITES = ("a", "b")
LENGTH = plan_vector_length("tiny", "fedmsa")  # the plan the test server runs (ServerConfig's defaults)


def _codec(root, site):
    b = load_bundle(root / site, role="client")
    return make_site_codec("ckks", b.context(), b.fingerprint, params=b.params)


def _upload_round(root, address, round_: int, value: float) -> None:
    codecs = {site: _codec(root, site) for site in SITES}
    for site, codec in codecs.items():
        with site_client(address, root / site, timeout=20) as client:
            client.commit_weight(round_, codec.fingerprint, codec.encrypt_scalar(1.0))
    for site, codec in codecs.items():
        payloads = codec.encrypt_vector(np.full(LENGTH, value))
        step = codec.chunk_values
        chunks = [Chunk(round_, i, len(payloads), min(step, LENGTH - i * step), codec.fingerprint, p, LENGTH)
                  for i, p in enumerate(payloads)]
        with site_client(address, root / site, timeout=20) as client:
            client.upload(lambda: chunks)
    with site_client(address, root / "a", timeout=20) as client:
        deadline = time.monotonic() + 20
        while client.status().round <= round_:  # the round closes apart from the last upload's call
            assert time.monotonic() < deadline, f"round {round_} did not close"
            time.sleep(0.05)


def test_a_site_learns_at_join_the_rounds_that_took_its_upload_also_after_a_restart(tmp_path):
    provision_sites(tmp_path, SITES, federation="t", he_dealer=True)
    fingerprint = load_bundle(tmp_path / "a", role="client").fingerprint
    with running_server(tmp_path / "server", tmp_path / "state", rounds=3) as address:
        with site_client(address, tmp_path / "a") as client:
            assert client.join(fingerprint, "test").contributed_rounds == ()
        _upload_round(tmp_path, address, 0, 0.1)
        with site_client(address, tmp_path / "a") as client:
            assert client.join(fingerprint, "test").contributed_rounds == (0,)
        _upload_round(tmp_path, address, 1, 0.2)
        with site_client(address, tmp_path / "a") as client:
            joined = client.join(fingerprint, "test")
            assert (joined.round, joined.contributed_rounds) == (2, (0, 1))
    # a site that wiped its own folder still learns what its budget has spent: the server's state keeps it
    with running_server(tmp_path / "server", tmp_path / "state", rounds=3) as address:
        with site_client(address, tmp_path / "b") as client:
            joined = client.join(fingerprint, "test")
            assert (joined.round, joined.contributed_rounds) == (2, (0, 1))


def test_the_server_process_never_imports_torch():
    code = ("import sys, fedfms_secure.cli, fedfms_secure.server.daemon, fedfms_secure.server.servicer; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"the server imports torch: {result.stderr[-2000:]}"
