"""The coordinator at SAM vit_b size: memory, disk and the time of each phase of one round.

The real server runs as its own process (``python -m fedfms_secure server``, mutual TLS on
127.0.0.1, state in SQLite + packs) with the plan's vector length; N sites, threads of this
process using the project's ``FederationClient``, send random encrypted updates of that length
(packed CKKS as ``keys init`` makes it; one random ciphertext per site reused for every chunk:
the server parses and adds each one all the same). Measured per run:

- server RSS when idle and at its peak (``VmHWM``), against the target 150 MB + 8 B/parameter;
- the state folder's largest size on disk during the round;
- phase times: commit (every site's E(n_k)), upload (from the first byte to the last site's
  receipt), close (from that receipt until the next round is open), download (every site
  streams the new global state); then round 1's upload and close (its sum starts from the
  stored state, which the server loads while the sites download and train);
- send time: the same N concurrent uploads to a null server (the same gRPC options and mutual
  TLS, a handler that only reads the stream), i.e. what the sites need to serialise and send
  their bytes; the target is upload <= 1.5x send time, and close < 10% of upload.

    python -m benchmarks.server_scale              # FedMSA N=2,4,8 and FedSAM N=2,4 (heavy)
    python -m benchmarks.server_scale --runs fedmsa:2 fedsam:2
    python -m benchmarks.server_scale --quick --out /tmp/scale   # a toy size, for the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from benchmarks import _common
from fedfms_secure.he.codec import make_site_codec
from fedfms_secure.he.packing import fit_params
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.protocol import Chunk
from fedfms_secure.server.plan_sizes import plan_vector_length
from fedfms_secure.transport.channel import MESSAGE_OPTIONS, client_channel, server_credentials
from fedfms_secure.transport.client import FederationClient
from fedfms_secure.v1 import federation_pb2 as pb
from fedfms_secure.v1 import federation_pb2_grpc as pb_grpc

ROUNDS = 3  # the plan's; the run closes rounds 0 and 1
DEFAULT_RUNS = ("fedmsa:2", "fedmsa:4", "fedmsa:8", "fedsam:2", "fedsam:4")
RSS_FIXED, RSS_PER_PARAM = 150e6, 8.0
#: the previous server (per-chunk fsync'd files under one lock, the close inside the last upload's
#: call, two copies of the sum), measured with the same kind of run on this machine
BASELINE = {
    "server RSS": "~560 MB idle (450 MB of it torch) + ~16.5 B/parameter",
    "FedSAM, 4 sites: upload phase": "101 s (59.5 s of it fsync'd per-chunk writes under the coordinator lock)",
    "FedSAM, 4 sites: round close": "21-36 s, inside the last uploader's UploadUpdate call",
    "FedSAM, 4 sites: download": "30 s for 4 x 674 MB (each chunk re-read the row and decoded the blob list)",
}


class _NullServicer(pb_grpc.FederationServicer):
    """Reads an upload stream and does nothing else: the sites' own cost of sending."""

    def UploadUpdate(self, request_iterator, context):  # noqa: N802 - gRPC's name
        chunks = size = 0
        for msg in request_iterator:
            chunks += 1
            size += len(msg.payload)
        return pb.UploadReceipt(round=0, chunks=chunks, bytes=size)


def null_server(keys: Path, address_file: Path) -> None:
    """Serves ``_NullServicer`` with the server bundle's mutual TLS until killed."""
    import grpc

    bundle = load_bundle(keys, role="server")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=MESSAGE_OPTIONS)
    pb_grpc.add_FederationServicer_to_server(_NullServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(bundle.ca_pem, bundle.cert_pem, bundle.key_pem))
    server.start()
    address_file.write_text(f"127.0.0.1:{port}")
    server.wait_for_termination()


class _Sampler(threading.Thread):
    """Samples a process's RSS and a folder's size on disk every 0.2 s."""

    def __init__(self, pid: int, folder: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.folder = pid, folder
        self.peak_disk = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak_disk = max(self.peak_disk, _disk(self.folder))


def _disk(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass  # deleted meanwhile
    return total


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def _wait_file(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the process did not start (exit {proc.poll()}): {log.read_text()[-2000:]}")
        time.sleep(0.05)
    text = path.read_text()
    return json.loads(text)["address"] if text.startswith("{") else text


def _provision(root: Path, sites: list[str]) -> None:
    params = fit_params(bound=1.0, sites=len(sites), rounds=ROUNDS)
    prov = init_federation(root / "prov", federation="scale", server_host="localhost", clients=sites,
                           he_dealer=True, params=params)
    export_bundle("server", None, prov, root / "server")
    for name in sites:
        export_bundle("client", name, prov, root / name)


def _stream(round_: int, length: int, step: int, fingerprint: str, full: bytes, last: bytes) -> Iterator[Chunk]:
    total = -(-length // step)
    for index in range(total):
        values = min(step, length - index * step)
        yield Chunk(round_, index, total, values, fingerprint, last if index == total - 1 else full, length)


def _all(sites: list[str], work: Callable[[str], Any]) -> tuple[float, list[Any]]:
    """Runs ``work`` for every site at once; returns the seconds until the last finished."""
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(len(sites)) as pool:
        results = list(pool.map(work, sites))
    return time.perf_counter() - start, results


def run_one(mode: str, sites_n: int, length: int, root: Path) -> dict[str, Any]:
    sites = [f"site_{i}" for i in range(sites_n)]
    _provision(root, sites)
    bundles = {s: load_bundle(root / s, role="client") for s in sites}
    codec = make_site_codec("ckks", bundles[sites[0]].context(), bundles[sites[0]].fingerprint,
                            params=bundles[sites[0]].params)
    step = codec.chunk_values
    rng = np.random.default_rng(0)
    full = codec.encrypt_vector(rng.uniform(-1e-4, 1e-4, step))[0]
    last = codec.encrypt_vector(rng.uniform(-1e-4, 1e-4, length - (-(-length // step) - 1) * step))[0]
    chunks = -(-length // step)

    def upload(client: FederationClient, round_: int = 0) -> Any:
        return client.upload(lambda: _stream(round_, length, step, codec.fingerprint, full, last))

    # the sites' own cost: the same concurrent uploads into a null server
    null_file = root / "null.address"
    null = subprocess.Popen([sys.executable, "-m", "benchmarks.server_scale", "--null-server", str(root / "server"),
                             str(null_file)], cwd=_common.ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(root / "null.log", "wb"))
    try:
        address = _wait_file(null_file, null, root / "null.log")
        clients = {s: FederationClient.from_bundle(bundles[s], address, call_timeout=600) for s in sites}
        send_s, _ = _all(sites, lambda s: upload(clients[s]))
        for c in clients.values():
            c.close()
    finally:
        null.kill()
        null.wait()

    state = root / "state"
    preset = "vit_b" if mode in ("fedsam", "fedmsa") and length == plan_vector_length("vit_b", mode) else "tiny"
    server = subprocess.Popen(
        [sys.executable, "-m", "fedfms_secure", "server", "--keys", str(root / "server"), "--state", str(state),
         "--address", "127.0.0.1:0", "--preset", preset, "--mode", mode, "--rounds", str(ROUNDS)],
        cwd=_common.ROOT, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"))
    sampler = _Sampler(server.pid, state)
    try:
        address = _wait_file(state / "address.json", server, root / "server.log")
        clients = {s: FederationClient.from_bundle(bundles[s], address, call_timeout=600) for s in sites}
        for s in sites:
            clients[s].join(codec.fingerprint, "benchmark")
        idle_rss = _proc_kb(server.pid, "VmRSS")
        sampler.start()
        weight = codec.encrypt_scalar(1.0)
        commit_s, _ = _all(sites, lambda s: clients[s].commit_weight(0, codec.fingerprint, weight))
        upload_s, receipts = _all(sites, lambda s: upload(clients[s]))
        sampler.peak_disk = max(sampler.peak_disk, _disk(state))  # every upload stored, none collected yet
        start = time.perf_counter()
        while clients[sites[0]].status().round < 1:
            time.sleep(0.01)
        close_s = time.perf_counter() - start

        def download(site: str) -> int:
            b = bundles[site]
            channel = client_channel(address, ca_pem=b.ca_pem, cert_pem=b.cert_pem, key_pem=b.key_pem,
                                     server_name="localhost")
            size = 0
            for msg in pb_grpc.FederationStub(channel).GetGlobalState(pb.GetGlobalStateRequest(round=1), timeout=600):
                size += len(msg.payload)
            channel.close()
            return size

        download_s, sizes = _all(sites, download)
        # round 1: its sum starts from the stored state, so its close writes no more than round 0's
        _all(sites, lambda s: clients[s].commit_weight(1, codec.fingerprint, weight))
        upload1_s, _ = _all(sites, lambda s: upload(clients[s], 1))
        start = time.perf_counter()
        while clients[sites[0]].status().round < 2:
            time.sleep(0.01)
        close1_s = time.perf_counter() - start
        peak_rss = _proc_kb(server.pid, "VmHWM")
        for c in clients.values():
            c.close()
    finally:
        sampler.stop.set()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    target = RSS_FIXED + RSS_PER_PARAM * length
    uploaded = sum(r.bytes for r in receipts)
    return {
        "mode": mode, "sites": sites_n, "parameters": length, "chunks": chunks,
        "bytes_per_site": receipts[0].bytes, "uploaded_bytes": uploaded, "downloaded_bytes": sum(sizes),
        "server_idle_rss_mb": idle_rss / 1e6, "server_peak_rss_mb": peak_rss / 1e6, "rss_target_mb": target / 1e6,
        "rss_bytes_per_param_over_idle": (peak_rss - idle_rss) / length,
        "peak_state_disk_mb": sampler.peak_disk / 1e6,
        "commit_s": commit_s, "upload_s": upload_s, "send_s_null_server": send_s, "upload_over_send": upload_s / send_s,
        "close_s": close_s, "close_over_upload": close_s / upload_s, "download_s": download_s,
        "round1_upload_s": upload1_s, "round1_close_s": close1_s,
    }


def _markdown(head: dict[str, Any], rows: list[dict[str, Any]], not_run: list[str]) -> str:
    lines = ["# The coordinator at SAM vit_b size: memory, disk, phase times", "", *_common.header_markdown(head), "",
             "Real server process over mutual TLS on 127.0.0.1, state in SQLite + pack files; N site threads with",
             "`FederationClient` send random packed-CKKS updates of the plan's length. Send time: the same",
             "uploads into a null server (same TLS and gRPC options, a handler that only reads).", "",
             "| mode | N | parameters | MB/site | server RSS idle / peak (target) MB | peak disk MB | commit s "
             "| upload s | send s (null) | upload/send | close s | close/upload | download s | round 1: upload s, close s |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['sites']} | {r['parameters']:,} | {r['bytes_per_site'] / 1e6:.0f} "
            f"| {r['server_idle_rss_mb']:.0f} / {r['server_peak_rss_mb']:.0f} ({r['rss_target_mb']:.0f}) "
            f"| {r['peak_state_disk_mb']:.0f} | {r['commit_s']:.2f} | {r['upload_s']:.1f} | {r['send_s_null_server']:.1f} "
            f"| {r['upload_over_send']:.2f} | {r['close_s']:.2f} | {r['close_over_upload']:.1%} | {r['download_s']:.1f} "
            f"| {r['round1_upload_s']:.1f}, {r['round1_close_s']:.2f} |")
    if not_run:
        lines += ["", f"Not run in this pass (time on this 2-core machine): {', '.join(not_run)}."]
    lines += ["", "Baseline: the previous server, measured the same way on this machine:", ""]
    lines += [f"- {k}: {v}" for k, v in BASELINE.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--null-server"]:
        null_server(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="MODE:SITES, e.g. fedsam:4")
    parser.add_argument("--quick", action="store_true", help="one toy run (the tiny preset's FedMSA vector, 2 sites)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS, help="folder for server_scale.md/.json")
    parser.add_argument("--skip-note", nargs="*", default=[], help="runs left out, named in the results")
    args = parser.parse_args(argv)
    runs = [("fedmsa", 2, plan_vector_length("tiny", "fedmsa"))] if args.quick else [
        (mode, int(n), plan_vector_length("vit_b", mode)) for mode, n in (r.split(":") for r in args.runs)]
    head = _common.header(argv=_common.script_argv(__file__, argv))
    progress = _common.Progress(len(runs))
    rows = []
    for mode, n, length in runs:
        progress.start(f"{mode} N={n} ({length:,} parameters)")
        with tempfile.TemporaryDirectory(prefix="server-scale-") as tmp:
            rows.append(run_one(mode, n, length, Path(tmp)))
        progress.finish(f"upload {rows[-1]['upload_s']:.1f} s, close {rows[-1]['close_s']:.2f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server_scale.json").write_text(json.dumps({"header": head, "baseline": BASELINE, "rows": rows},
                                                           indent=2) + "\n")
    (args.out / "server_scale.md").write_text(_markdown(head, rows, args.skip_note))
    print(_markdown(head, rows, args.skip_note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
