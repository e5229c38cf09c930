"""What a real server daemon refuses before it serves: a port another server holds, a state folder
another daemon uses, an address that is not HOST:PORT or not on this machine; and what a site sees
when it cannot talk to the server (a bundle of another federation, nobody listening)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from federation_kit import provision_sites

from fedfms_secure.statelock import StateLock

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfms_secure", *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guards")
    provision_sites(root, ["a", "b"], federation="one")
    provision_sites(root / "other", ["a", "b"], federation="one")  # another federation with the same site names
    return root


@pytest.fixture(scope="module")
def server(fed: Path):
    """A real server daemon on a fixed port: (address, state folder, process)."""
    port = _free_port()
    state = fed / "state-1"
    proc = subprocess.Popen([sys.executable, "-m", "fedfms_secure", "server", "--keys", str(fed / "server"),
                             "--state", str(state), "--address", f"127.0.0.1:{port}", "--rounds", "1",
                             "--log-file", str(fed / "logs" / "server.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 60
    while not (state / "address.json").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield f"127.0.0.1:{port}", state, proc
    proc.terminate()
    proc.wait(timeout=30)


def test_a_second_server_on_a_held_port_is_refused(fed: Path, server) -> None:
    address, _, _ = server
    done = _cli("server", "--keys", str(fed / "server"), "--state", str(fed / "state-2"), "--address", address)
    assert done.returncode == 1
    assert f"cannot listen on {address}: address in use" in done.stderr
    assert "server listening" not in done.stderr


def test_a_state_folder_in_use_is_refused_with_the_pid(fed: Path, server) -> None:
    _, state, proc = server
    done = _cli("server", "--keys", str(fed / "server"), "--state", str(state), "--address", "127.0.0.1:0")
    assert done.returncode == 1
    assert f"state folder {state} in use by PID {proc.pid}" in done.stderr
    assert json.loads((state / "address.json").read_text())  # the running server's files are untouched


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:99999", "the port must be 0..65535"),
    ("127.0.0.1", "is not HOST:PORT"),
    ("localhost:http", "is not HOST:PORT"),
])
def test_a_malformed_address_is_refused_before_binding(fed: Path, tmp_path: Path, address: str, expected: str) -> None:
    done = _cli("server", "--keys", str(fed / "server"), "--state", str(tmp_path / "s"), "--address", address)
    assert done.returncode == 1 and expected in done.stderr
    assert not (tmp_path / "s").exists()  # nothing written


def test_an_address_not_on_this_machine_gets_a_hint(fed: Path, tmp_path: Path) -> None:
    done = _cli("server", "--keys", str(fed / "server"), "--state", str(tmp_path / "s"),
                "--address", "192.0.2.7:50051")  # TEST-NET-1: never this machine's
    assert done.returncode == 1
    assert "192.0.2.7 is not an address of this machine" in done.stderr and "0.0.0.0:50051" in done.stderr


def test_a_site_state_folder_in_use_is_refused(tmp_path: Path) -> None:
    with StateLock(tmp_path / "site-state", "site daemon"):
        done = _cli("client", "--keys", str(tmp_path / "k"), "--data", str(tmp_path / "d"),
                    "--state", str(tmp_path / "site-state"))
    assert done.returncode == 1
    assert f"state folder {tmp_path / 'site-state'} in use by PID {os.getpid()}" in done.stderr


def test_a_bundle_of_another_federation_stops_at_once_naming_the_likely_cause(fed: Path, server) -> None:
    address, _, _ = server
    t0 = time.monotonic()
    done = _cli("status", "--server", address, "--keys", str(fed / "other" / "a"), "--timeout", "30")
    assert done.returncode == 1
    assert "TLS handshake with the server at" in done.stderr and "another federation" in done.stderr
    assert time.monotonic() - t0 < 25  # it did not wait out --timeout


def test_an_unreachable_server_is_announced_once_then_refused(fed: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    done = _cli("status", "--server", address, "--keys", str(fed / "a"), "--timeout", "5")
    assert done.returncode == 1
    assert done.stderr.count(f"waiting for the server at {address} (gives up after 5 s, --timeout)") == 1
    assert f"cannot reach the server at {address} after 5 s" in done.stderr


def test_client_help_shows_the_connect_timeout_default() -> None:
    done = _cli("client", "--help")
    text = " ".join(done.stdout.split())
    entry = text.split("--connect-timeout CONNECT_TIMEOUT ")[-1].split(" --", 1)[0]  # its line, not the usage
    assert "seconds to wait for the server at start-up" in entry and "(default: 60)" in entry


def test_log_file_gets_the_same_lines_as_stderr(fed: Path, server) -> None:
    address, _, _ = server
    text = (fed / "logs" / "server.log").read_text()
    assert "server listening" in text and f"address={address}" in text
