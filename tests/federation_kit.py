"""Helpers shared by tests that run a federation for real: its bundles on disk, the server daemon
in a thread, a site's mutual-TLS connection to it.

Imported as ``from federation_kit import ...``: pytest puts ``tests/`` on ``sys.path`` for the
``conftest.py`` there (no ``__init__.py``, default import mode).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from fedfms_secure.config import ServerConfig
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.server.daemon import ServerLimits, serve
from fedfms_secure.transport.client import FederationClient
from fedfms_secure.v1 import federation_pb2_grpc as pb_grpc


def provision_sites(root: Path, sites: Sequence[str], **init: Any) -> Path:
    """``init_federation`` into ``root/prov`` (server host ``localhost``), the server's bundle in
    ``root/server`` and each site's in ``root/<site>``; ``init`` goes to ``init_federation``."""
    prov = init_federation(root / "prov", server_host="localhost", clients=list(sites), **init)
    export_bundle("server", None, prov, root / "server")
    for name in sites:
        export_bundle("client", name, prov, root / name)
    return prov


@contextmanager
def running_server(keys: Path, state: Path, limits: ServerLimits | None = None, **config: Any) -> Iterator[str]:
    """``server.daemon.serve`` in a thread with the server bundle ``keys``, the state folder
    ``state``, a free port on 127.0.0.1, ``limits`` and the other ``ServerConfig`` fields in ``config``:
    yields its address once it wrote ``address.json``; on exit stops it and fails if it raised."""
    stop, errors = threading.Event(), []
    server_config = ServerConfig(keys=keys, state=state, address="127.0.0.1:0", **config)
    address_file = state / "address.json"
    if address_file.exists():  # left by an earlier run on the same state folder
        address_file.unlink()

    def run() -> None:
        try:
            serve(server_config, stop, limits)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not address_file.exists():
        assert not errors and time.monotonic() < deadline, f"server did not start: {errors}"
        time.sleep(0.02)
    try:
        yield json.loads(address_file.read_text())["address"]
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not errors, errors


def site_client(address: str, bundle: Path, timeout: float = 20.0) -> FederationClient:
    """A ``FederationClient`` with the site bundle's certificate and key (mutual TLS)."""
    b = load_bundle(bundle, role="client")
    return FederationClient.from_bundle(b, address, call_timeout=timeout)


def site_stub(address: str, bundle: Path) -> tuple[grpc.Channel, pb_grpc.FederationStub]:
    """A raw gRPC channel and stub with the site bundle's certificate and key (mutual TLS)."""
    b = load_bundle(bundle, role="client")
    creds = grpc.ssl_channel_credentials(root_certificates=b.ca_pem, private_key=b.key_pem, certificate_chain=b.cert_pem)
    channel = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", b.server_host)])
    return channel, pb_grpc.FederationStub(channel)
