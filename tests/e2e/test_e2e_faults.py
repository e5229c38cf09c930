"""Fault tests: real server and site daemons on loopback (mutual TLS, DP-SGD, packed CKKS).

Each daemon scenario runs 2-3 sites for 2 rounds (``tiny`` preset, one local epoch) and checks, for
every round, that the aggregate each completing site decrypted equals the plaintext reference
``sum_k weight_k * delta_k`` over the sites that the server lists as the round's participants,
with ``weight_k = n_k / N`` and ``delta_k`` from each site's ``--save-updates`` file. The tolerance
is what the packing allows: stochastic rounding moves each value of each upload by less than one
quantisation step ``h = bound * 2**-quant_bits`` (1.0 * 2**-16 here), so the sum of K uploads is off
by less than ``K * h`` (3.1e-5 for two sites). CKKS adds no error of its own there: the packed
integers are summed exactly.

* the server is killed (-9) mid-round and restarted on the same port and state folder;
* a site is killed right after committing, with ``--round-deadline``: it counts as a zero delta;
* a site that never answers (SIGSTOPped after joining): the rounds close on quorum;
* a duplicated upload gets the same receipt and a replayed old-round upload FAILED_PRECONDITION
  (in-process server and client).

Every federation is provisioned without a CKKS dealer: once the server first listens, the first
site makes the CKKS key (he-init) and the others fetch their envelopes; a restarted server keeps
the key epoch in its state folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedfms_secure.site.hekeys import Keyring
from fedfms_secure.config import ServerConfig
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.data import synth_federation
from fedfms_secure.demo import _spawn, _stop_all, _wait_for_address
from fedfms_secure.privacy.budget import read_ledger
from fedfms_secure.errors import FederationError, UpdateAlreadyReceived
from fedfms_secure.protocol import Chunk
from fedfms_secure.server.daemon import serve
from fedfms_secure.server.plan_sizes import plan_vector_length
from fedfms_secure.server.store import StateStore
from fedfms_secure.site.metrics import read_metrics
from fedfms_secure.transport.client import FederationClient

ROUNDS = 2
CLI = [sys.executable, "-m", "fedfms_secure"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
WAIT = 300.0  # bound on any single wait for a daemon


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[Path]:
    return synth_federation(tmp_path_factory.mktemp("data"), sites=3, seed=0, shape=(64, 64, 24))


class Federation:
    """Provisioned bundles, a server and its sites as subprocesses; always cleaned up."""

    def __init__(self, root: Path, sites: list[Path], provision) -> None:
        self.root = root
        self.sites = {site.name: site for site in sites}
        self.keys = provision(root, list(self.sites), federation="faults", rounds=ROUNDS)
        self.keyed = False  # whether a site has made the CKKS key yet
        packing = load_bundle(self.keys.bundles["server"], role="server").params.packing
        self.step = packing.step
        self.state = root / "state_server"
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopped: set[str] = set()  # SIGSTOPped, to be SIGKILLed at clean-up
        self.expected_dead: set[str] = set()  # killed on purpose

    def start_server(self, address: str, *extra: str, log: str = "server") -> subprocess.Popen:
        self.procs[log] = _spawn(
            [*CLI, "server", "--keys", str(self.keys.bundles["server"]), "--address", address, "--state",
             str(self.state), "--rounds", str(ROUNDS), "--local-epochs", "1", *extra],
            self.root / f"{log}.log", ENV)
        if not self.keyed:  # once the server first listens, the first site makes the CKKS key
            listening = _wait_for_address(self.state, self.procs[log], self.root / f"{log}.log")
            self.keys.he_init(next(iter(self.sites)), listening)
            self.keyed = True
        return self.procs[log]

    def start_site(self, name: str, address: str) -> subprocess.Popen:
        self.procs[name] = _spawn(
            [*CLI, "client", "--keys", str(self.keys.bundles[name]), "--server", address, "--data", str(self.sites[name]),
             "--state", str(self.root / f"state_{name}"), "--epsilon", "50", "--save-updates",
             "--connect-timeout", str(int(WAIT))],
            self.root / f"{name}.log", ENV)
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def status(self) -> dict:
        try:
            return json.loads((self.state / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_for(self, what: str, predicate, timeout: float = WAIT, interval: float = 0.05):
        """Polls ``predicate()`` until it returns something truthy; fails if a daemon died meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            for name, proc in self.procs.items():
                if proc.poll() not in (None, 0) and name not in self.expected_dead:
                    pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.log(name)[-3000:]}")
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; status {self.status()}")

    def wait_exit(self, name: str) -> int:
        """``name``'s exit code; fails at once if another daemon fails meanwhile (it would wait forever)."""
        proc = self.procs[name]
        self.wait_for(f"{name} to exit", lambda: proc.poll() is not None or None, interval=0.2)
        return proc.returncode

    def wait_ok(self, *names: str) -> None:
        for name in names:
            code = self.wait_exit(name)
            assert code == 0, f"{name} exited with {code}:\n{self.log(name)[-3000:]}"

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.procs[name].send_signal(sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(name)
        elif sig == signal.SIGCONT:
            self.stopped.discard(name)

    def cleanup(self) -> None:
        for name in self.stopped:  # a stopped process only dies of SIGKILL
            if self.procs[name].poll() is None:
                self.procs[name].kill()
        _stop_all(self.procs)

    # --- the checks every scenario shares ---------------------------------------------------------
    def rounds(self) -> list[dict]:
        return StateStore(self.state).read_records("rounds.jsonl")

    def check_aggregates(self) -> dict[int, dict[str, dict]]:
        """Every round's decrypted aggregate equals sum_k weight_k * delta_k over its participants."""
        records = self.rounds()
        assert [r["round"] for r in records] == list(range(ROUNDS))
        saved: dict[int, dict[str, dict]] = {}
        for record in records:
            r = record["round"]
            dumps = {}
            for name in self.sites:
                path = self.root / f"state_{name}" / "updates" / f"round_{r}.npz"
                if path.exists():
                    with np.load(path) as z:
                        dumps[name] = {key: z[key] for key in z.files}
            participants = record["participants"]
            assert participants and set(participants) <= set(dumps), (r, participants, sorted(dumps))
            expected = sum(float(dumps[k]["weight"]) * dumps[k]["delta"] for k in participants)
            atol = len(participants) * self.step
            assert np.abs(expected).max() > 100 * atol  # training moved the parameters: the check has teeth
            for name, dump in dumps.items():
                np.testing.assert_allclose(dump["aggregate"], expected, rtol=0, atol=atol,
                                           err_msg=f"round {r}, aggregate decrypted by {name}")
            saved[r] = dumps
        for name in self.sites:
            if (self.root / f"{name}.log").exists():
                # the reference holds only for unclipped updates: every round logs its count, all 0
                counts = re.findall(r"clipped to the CKKS bound .*?values=(\d+)", self.log(name))
                assert not any(int(c) for c in counts), counts
        return saved


@pytest.fixture
def federation(tmp_path, data, request, provision):
    count = request.param
    fed = Federation(tmp_path, data[:count], provision)
    try:
        yield fed
    finally:
        fed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dialers(fed: Federation, port: int, count: int) -> None:
    """Listens on ``port`` until ``count`` sites dial it (their start-up is done), then frees it."""
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.2)
    conns: list[socket.socket] = []
    deadline = time.monotonic() + WAIT
    try:
        while len(conns) < count:
            assert time.monotonic() < deadline, f"only {len(conns)} of {count} sites dialled the server"
            for name, proc in fed.procs.items():
                assert proc.poll() is None, f"{name} exited:\n{fed.log(name)[-3000:]}"
            try:
                conns.append(listener.accept()[0])
            except socket.timeout:
                pass
    finally:
        for conn in conns:
            conn.close()
        listener.close()


# --- the scenarios ---------------------------------------------------------------------------------
@pytest.mark.parametrize("federation", [2], indirect=True)
def test_server_killed_mid_round_resumes_and_the_sites_finish(federation):
    fed = federation
    server = fed.start_server("127.0.0.1:0")
    address = _wait_for_address(fed.state, server, fed.root / "server.log")
    for name in fed.sites:
        fed.start_site(name, address)
    # hold the first site to commit in round 0 (it waits for E(N)), so that the other one's upload is
    # in the database but the round is still open when the server dies
    held = fed.wait_for("a commit in round 0", lambda: fed.status().get("committed"))[0]
    fed.signal(held, signal.SIGSTOP)
    at_kill = fed.wait_for("an upload in round 0",
                           lambda: (s := fed.status()) and (s["uploaded"] or s["round"] > 0) and s)
    server.kill()
    assert server.wait(timeout=30) == -signal.SIGKILL
    fed.expected_dead.add("server")

    fed.start_server(address, "--exit-when-done", log="server_restarted")
    fed.wait_for("the restarted server to listen", lambda: "server listening" in fed.log("server_restarted"))
    fed.signal(held, signal.SIGCONT)
    fed.wait_ok(*fed.sites, "server_restarted")

    log = fed.log("server_restarted")
    assert f"address={address}" in log
    resumed = next(line for line in log.splitlines() if "resumed from the state folder" in line)
    fields = dict(re.findall(r"(\w+)=(\S+)", resumed))
    # what status.json showed had been stored (it is written after each database transaction)
    assert int(fields["round"]) == at_kill["round"] + 1, (resumed, at_kill)  # the log counts rounds from 1
    assert int(fields["commits"]) >= len(at_kill["committed"]) and int(fields["uploads"]) >= len(at_kill["uploaded"])
    if at_kill["round"] == 0:  # the usual case: one upload received, the held site's still to come
        assert fields["phase"] == "upload" and int(fields["uploads"]) == 1, resumed
    assert any("server unreachable; retrying" in fed.log(name) for name in fed.sites)
    rounds = fed.rounds()
    assert [sorted(r["participants"]) for r in rounds] == [sorted(fed.sites)] * ROUNDS
    assert all(r["zero_delta"] == [] for r in rounds)
    fed.check_aggregates()


@pytest.mark.parametrize("federation", [2], indirect=True)
def test_site_killed_after_committing_counts_as_a_zero_delta(federation):
    fed = federation
    deadline = 30.0
    port = _free_port()
    address = f"127.0.0.1:{port}"
    survivor, victim = sorted(fed.sites)
    for name in fed.sites:
        fed.start_site(name, address)
    # start the server (and its deadline clock) once both sites are past their start-up
    _wait_for_dialers(fed, port, len(fed.sites))
    fed.start_server(address, "--round-deadline", str(deadline), "--min-sites", "1")

    # round 1: hold the survivor while the victim commits, then kill the victim before it uploads
    fed.wait_for("round 1", lambda: fed.status().get("round") == 1)
    fed.signal(survivor, signal.SIGSTOP)
    assert survivor not in fed.status()["committed"]
    fed.wait_for(f"{victim} to commit in round 1", lambda: victim in fed.status().get("committed", []))
    fed.procs[victim].kill()
    fed.expected_dead.add(victim)
    fed.signal(survivor, signal.SIGCONT)

    fed.wait_ok(survivor)
    assert fed.procs[victim].wait(timeout=30) == -signal.SIGKILL
    rounds = fed.rounds()
    assert [(sorted(r["participants"]), r["zero_delta"]) for r in rounds] == [
        (sorted(fed.sites), []), ([survivor], [victim])]
    log = fed.log("server")
    assert "upload deadline: committed sites that did not upload count as a zero delta" in log
    dumps = fed.check_aggregates()
    # the victim's weight was in E(N): the survivor's weight is below one (a conservative step)
    assert sorted(dumps[1]) == [survivor] and 0 < float(dumps[1][survivor]["weight"]) < 0.999
    # graceful shutdown on SIGTERM
    fed.procs["server"].terminate()
    assert fed.procs["server"].wait(timeout=30) == 0
    assert "server stopped" in fed.log("server")


@pytest.mark.parametrize("federation", [3], indirect=True)
def test_a_site_that_never_answers_the_rounds_close_on_quorum(federation):
    fed = federation
    server = fed.start_server("127.0.0.1:0", "--round-deadline", "4", "--min-sites", "2")
    address = _wait_for_address(fed.state, server, fed.root / "server.log")
    *live, silent = sorted(fed.sites)
    for name in fed.sites:
        fed.start_site(name, address)
    fed.wait_for(f"{silent} to join", lambda: f"site joined round=1 site={silent}" in fed.log("server"))
    fed.signal(silent, signal.SIGSTOP)  # it holds its connection and never says another word

    fed.wait_ok(*live)
    assert fed.procs[silent].poll() is None  # still there, still silent
    rounds = fed.rounds()
    assert [(sorted(r["participants"]), r["zero_delta"]) for r in rounds] == [(live, [])] * ROUNDS
    assert "commit deadline: the round goes on without the sites that did not commit" in fed.log("server")
    fed.check_aggregates()
    assert not (fed.root / f"state_{silent}" / "updates").exists()


def _deadline_federation_joined(fed: Federation) -> tuple[str, str, str]:
    """A server with a 4 s round deadline and a quorum of one, and both sites joined; returns the
    address and the two sites' names (punctual, late)."""
    server = fed.start_server("127.0.0.1:0", "--round-deadline", "4", "--min-sites", "1", "--exit-when-done")
    address = _wait_for_address(fed.state, server, fed.root / "server.log")
    punctual, late = sorted(fed.sites)
    for name in fed.sites:
        fed.start_site(name, address)
    fed.wait_for(f"{late} to join", lambda: f"site joined round=1 site={late}" in fed.log("server"))
    return address, punctual, late


@pytest.mark.parametrize("federation", [2], indirect=True)
def test_a_late_site_misses_a_round_and_takes_part_again(federation):
    fed = federation
    address, punctual, late = _deadline_federation_joined(fed)
    fed.signal(late, signal.SIGSTOP)  # it sleeps through round 0 ...
    fed.wait_for("round 0 to close", lambda: fed.rounds())
    fed.signal(late, signal.SIGCONT)  # ... and wakes up with a round-0 update nobody wants any more

    fed.wait_ok(punctual, late, "server")
    # woken mid-training, its update is refused; woken before training, it does not train round 0 at all
    log = fed.log(late)
    assert "takes part again from the next round" in log or "waits for the next one instead of training" in log
    rounds = fed.rounds()
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert rounds[0]["participants"] == [punctual]
    metrics = StateStore(fed.state).read_records("metrics.jsonl")
    late_rounds = {m["round"]: m["contributed"] for m in metrics if m["site"] == late}
    # it reports every round whose global model it scored (a site that woke after several rounds
    # closed scores only the newest), the last one included, so the server could finish
    assert late_rounds.get(0, 0.0) == 0.0 and ROUNDS - 1 in late_rounds


@pytest.mark.parametrize("federation", [2], indirect=True)
def test_a_site_restarted_after_its_commit_deadline_waits_without_training(federation):
    fed = federation
    address, punctual, late = _deadline_federation_joined(fed)
    fed.procs[late].kill()  # joined, so the commit phases wait for it until their deadline
    assert fed.procs[late].wait(timeout=30) == -signal.SIGKILL
    fed.expected_dead.add(late)
    # round 1: hold the punctual site once it has committed, so that the upload phase stays open
    fed.wait_for(f"{punctual} to commit in round 1",
                 lambda: (s := fed.status()).get("round") == 1 and punctual in s.get("committed", []))
    fed.signal(punctual, signal.SIGSTOP)
    fed.wait_for("the commit deadline of round 1", lambda: fed.status().get("phase") == "upload")
    state = fed.root / f"state_{late}"
    spent_before = [e["round"] for e in read_ledger(state)] if state.is_dir() else []
    fed.expected_dead.discard(late)
    fed.start_site(late, address)  # restarted with the same --state, too late for round 1
    fed.wait_for(f"{late} to wait for round 2",
                 lambda: "waits for the next one instead of training" in fed.log(late))
    fed.signal(punctual, signal.SIGCONT)

    fed.wait_ok(punctual, late, "server")
    # no training, so no budget spent, for the round it could not join
    assert [e["round"] for e in read_ledger(state)] == spent_before
    assert (state / "final_model.pt").exists()
    assert fed.rounds()[1]["participants"] == [punctual]
    metrics = StateStore(fed.state).read_records("metrics.jsonl")
    reported = {m["round"]: m["contributed"] for m in metrics if m["site"] == late}
    assert reported[1] == 0.0  # it scored the final global model like the others
    assert all("dice" not in m for m in metrics)  # ... and kept its score to itself
    kept = {r["round"]: r for r in read_metrics(state)}
    assert kept[1]["contributed"] == 0.0 and "dice_local" not in kept[1]  # it did not train round 1
    assert isinstance(kept[1]["dice"], float)


# --- duplicated and replayed uploads (in-process server and clients) ------------------------------
def test_a_duplicated_upload_gets_the_same_receipt_and_an_old_round_replay_is_refused(tmp_path, provision):
    sites = ("a", "b")
    keys = provision(tmp_path, sites, federation="dup", rounds=ROUNDS)
    stop = threading.Event()
    config = ServerConfig(keys=keys.bundles["server"], state=tmp_path / "state", address="127.0.0.1:0",
                          rounds=ROUNDS)
    thread = threading.Thread(target=serve, args=(config, stop), daemon=True)
    thread.start()
    clients: dict[str, FederationClient] = {}
    try:
        address = _wait_for_file(tmp_path / "state" / "address.json")["address"]
        keys.he_init("a", address)
        codecs = {}
        for name in sites:
            clients[name] = keys.connect(name, address)
            ring = Keyring(clients[name], load_bundle(keys.bundles[name], role="client"), timeout=30)
            ring.sync(clients[name].status().key)  # b opens the envelope a sealed to it
            codecs[name] = ring.codec
            clients[name].join(ring.fingerprint, "test")
        rng = np.random.default_rng(0)
        length = plan_vector_length("tiny", "fedmsa")  # the plan's vector (the server refuses any other)
        n_chunks = -(-length // codecs["a"].chunk_values)
        counts = {"a": 30, "b": 10}
        expected = np.zeros(length)
        old_streams: dict[str, list[Chunk]] = {}
        for r in range(ROUNDS):
            for name in sites:
                clients[name].commit_weight(r, codecs[name].fingerprint, codecs[name].encrypt_scalar(counts[name]))
            big_n = round(codecs["a"].decrypt_scalar(clients["a"].weight_total(r).payload))
            assert big_n == sum(counts.values())
            streams, updates = {}, {}
            for name in sites:
                updates[name] = rng.uniform(-0.01, 0.01, length) * counts[name] / big_n
                expected += updates[name]
                streams[name] = _stream(codecs[name], r, updates[name])
            update_a = updates["a"]
            if r == 1:  # replays of round 0's uploads, in round 1
                for name in sites:
                    with pytest.raises(FederationError, match="round 0") as exc:
                        clients[name].upload(lambda: old_streams[name])
                    assert exc.value.code == "failed_precondition"
            first = clients["a"].upload(lambda: streams["a"])
            again = clients["a"].upload(lambda: streams["a"])  # the very same stream, sent again
            assert again == first and first.round == r and first.chunks == n_chunks
            # a retry that re-encrypted the update (as a site does after a lost reply) is not counted again
            with pytest.raises(UpdateAlreadyReceived, match="already uploaded a different update") as exc:
                clients["a"].upload(lambda: _stream(codecs["a"], r, update_a))
            assert exc.value.code == "failed_precondition"
            assert [s.uploaded for s in clients["b"].status().sites] == [True, False]  # counted once, round open
            clients["b"].upload(lambda: streams["b"])
            deadline = time.monotonic() + 30  # the round closes apart from the call that brought its last upload
            while clients["a"].status().round == r and time.monotonic() < deadline:
                time.sleep(0.02)
            assert clients["a"].status().round == r + 1
            # the round has closed with a's update: the same stream, or a re-encrypted one, is refused
            for stream in (streams["a"], _stream(codecs["a"], r, update_a)):
                with pytest.raises(UpdateAlreadyReceived, match=f"already uploaded its update for round {r}") as exc:
                    clients["a"].upload(lambda: stream)
                assert exc.value.code == "failed_precondition"
            old_streams = streams
        chunks = clients["b"].global_state(ROUNDS)
        total = codecs["b"].decrypt_vector([c.payload for c in chunks], chunks[0].vector_length)
        atol = len(sites) * ROUNDS * codecs["b"].step
        assert np.abs(expected).max() > 100 * atol
        np.testing.assert_allclose(total, expected, rtol=0, atol=atol)
        records = StateStore(tmp_path / "state").read_records("rounds.jsonl")
        assert [(r["round"], r["participants"]) for r in records] == [(r, list(sites)) for r in range(ROUNDS)]
    finally:
        for client in clients.values():
            client.close()
        stop.set()
        thread.join(timeout=15)


def _stream(codec, round_: int, vector: np.ndarray) -> list[Chunk]:
    step = codec.chunk_values
    payloads = codec.encrypt_vector(vector)
    return [Chunk(round_, i, len(payloads), min(step, vector.size - i * step), codec.fingerprint, p, vector.size)
            for i, p in enumerate(payloads)]


def _wait_for_file(path: Path, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return json.loads(path.read_text())
