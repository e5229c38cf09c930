"""Provisioning for end-to-end tests the way an operator does it: no CKKS dealer (the provisioning
host makes certificates and envelope keys only); once the server runs, one site makes the CKKS
key with he-init and seals it to the others, which fetch it at start."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedfms_secure.site.hekeys import Published, init_key
from fedfms_secure.he.ckks import CkksParams
from fedfms_secure.keys.bundle import load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation
from fedfms_secure.he.packing import fit_params
from fedfms_secure.transport.client import FederationClient


@dataclass(frozen=True)
class Provisioned:
    """A provisioning folder and one bundle per party: ``bundles[name]``, ``bundles["server"]``."""

    prov: Path
    bundles: dict[str, Path]

    def connect(self, site: str, address: str, timeout: float = 30.0) -> FederationClient:
        b = load_bundle(self.bundles[site], role="client")
        client = FederationClient.from_bundle(b, address, call_timeout=timeout)
        client.wait_ready(timeout)
        return client

    def he_init(self, site: str, address: str) -> Published:
        """`keys he-init` at ``site``: its bundle keeps the new key, the others get envelopes."""
        with self.connect(site, address) as client:
            return init_key(client, load_bundle(self.bundles[site], role="client"))


def _provision(root: Path, sites: Sequence[str], *, federation: str = "e2e", rounds: int = 2,
               params: CkksParams | None = None) -> Provisioned:
    params = params or fit_params(bound=1.0, sites=len(sites), rounds=rounds)
    prov = init_federation(root / "prov", federation=federation, server_host="localhost", clients=list(sites),
                           params=params, he_dealer=False)
    bundles = {"server": export_bundle("server", None, prov, root / "bundles" / "server")}
    for name in sites:
        bundles[name] = export_bundle("client", name, prov, root / "bundles" / name)
    return Provisioned(prov, bundles)


@pytest.fixture(scope="module")
def provision() -> Callable[..., Provisioned]:
    """Factory: ``provision(root, sites, federation=..., rounds=..., params=...)`` without a CKKS dealer."""
    return _provision
