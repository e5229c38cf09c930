"""Provisioning: create a federation's key material and export one bundle per party.

``init_federation(out, ...)`` (``fedfms-secure keys init``) writes the provisioning folder::

    out/federation.json          federation, server_host, clients, algorithm, days, created,
                                 ckks {params, fingerprint}; params.packing when ``params`` has
                                 one (``packing.choose_params``): both daemons read it back from
                                 their bundle (``Bundle.params``)
    out/ca/ca.crt                federation CA certificate
    out/ca/ca.key         0600   CA private key (keep it offline)
    out/server/tls.crt, tls.key  server certificate (SANs = server_host, + localhost/127.0.0.1/::1
                                 for a loopback host) and its key (0600)
    out/clients/<name>/tls.crt, tls.key
                                 one per site: CN = SAN = site name, EKU clientAuth; key 0600
    out/he/site.ctx       0600   CKKS context with the SECRET key (every site gets a copy)
    out/he/server.ctx            CKKS parameters only, no key of any kind (the server's)

``export_bundle(role, name, out_folder, bundle)`` (``fedfms-secure keys export``) copies what one
party needs into a bundle folder::

    ca.crt  tls.crt  tls.key (0600)  ckks.ctx (server: params only; client: with secret key, 0600)
    manifest.json   {role, name, federation, server_host, clients,
                     ckks: {params, fingerprint, has_secret_key}, files: {filename: sha256}}

``load_bundle`` (in ``bundle.py``, re-exported here) checks a bundle before a daemon uses it.
The provisioning host holds the CKKS secret key while it runs ``init``; delete ``out/he/site.ctx``
there once the client bundles are delivered.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedfms_secure.crypto import pki
from fedfms_secure.crypto._jsonfile import read_json_object
from fedfms_secure.crypto.bundle import MANIFEST, Bundle, load_bundle
from fedfms_secure.crypto.ckks import (
    CkksParams,
    context_fingerprint,
    load_context,
    new_secret_context,
    serialize_params_only,
    serialize_site_context,
)
from fedfms_secure.errors import ConfigError, KeyMaterialError

# Bundle and load_bundle are re-exported: callers import them from here.
__all__ = ["Bundle", "export_bundle", "init_federation", "load_bundle", "validate_host", "validate_name"]

FEDERATION_JSON = "federation.json"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def validate_name(name: str, *, what: str) -> str:
    """Return ``name`` if it is a safe party name (``[A-Za-z0-9_.-]{1,64}``, not '.' or '..')."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{what} {name!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 _ . - (not '.' or '..')"
        )
    return name


def validate_host(host: str) -> str:
    """Return ``host`` if it can be the server's certificate SAN: a DNS name or an IP address.

    ConfigError for an empty host, one with a port or path (``host:50051``, ``https://host``) or
    with whitespace; a ':' is only allowed inside an IPv6 address (``::1``).
    """
    if not isinstance(host, str) or not host:
        raise ConfigError("server_host is empty: give the DNS name or IP address that sites dial")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if ":" in host or "/" in host or any(c.isspace() for c in host):
        raise ConfigError(
            f"server_host {host!r} is not a bare DNS name or IP address: give the host alone (e.g. "
            "'coordinator.example.org', '10.0.0.5' or '::1'), without a port, scheme or path; the port is "
            "set when the server starts"
        )
    return host


def init_federation(
    out: Path,
    *,
    federation: str,
    server_host: str,
    clients: Sequence[str],
    params: CkksParams = CkksParams(),
    algorithm: str = "ecdsa-p256",
    days: int = 365,
) -> Path:
    """Create CA, server and site certificates and the CKKS context under ``out``; return ``out``."""
    out = Path(out)
    _refuse_non_empty(out, flag="--out")
    validate_name(federation, what="federation name")
    validate_host(server_host)
    clients = [validate_name(c, what="client name") for c in clients]
    if not clients:
        raise ConfigError("the client list is empty: name at least one site (e.g. --client site-a)")
    duplicates = sorted({c for c in clients if clients.count(c) > 1})
    if duplicates:
        raise ConfigError(f"duplicate client names {duplicates}: every site needs its own name")
    if algorithm not in pki.GRPC_ALGORITHMS:
        raise ConfigError(
            f"key algorithm {algorithm!r} cannot be used: gRPC's TLS (BoringSSL) refuses Ed25519 certificates "
            f"(NO_COMMON_SIGNATURE_ALGORITHMS); use {pki.GRPC_ALGORITHMS[0]}"
        )

    existed = out.exists()
    try:
        _provision(out, federation, server_host, clients, params, algorithm, days)
    except BaseException:
        # leave no half-written key store behind
        if existed:
            for child in out.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        else:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _provision(
    out: Path, federation: str, server_host: str, clients: list[str], params: CkksParams, algorithm: str, days: int
) -> None:
    ctx = new_secret_context(params)
    fingerprint = context_fingerprint(ctx)
    for sub in ("ca", "server", "clients", "he"):
        (out / sub).mkdir(parents=True, mode=0o700)

    ca_key = pki.new_private_key(algorithm)
    ca = pki.make_ca(f"fedfms-secure {federation} CA", ca_key, days=max(days, 1) + 1)
    (out / "ca" / "ca.crt").write_bytes(pki.pem_cert(ca))
    pki.write_private(out / "ca" / "ca.key", pki.pem_private_key(ca_key))

    server_key = pki.new_private_key(algorithm)
    server = pki.issue_certificate(ca, ca_key, server_host, server_key, role="server", hosts=[server_host], days=days)
    _write_pair(out / "server", server, server_key)
    for name in clients:
        key = pki.new_private_key(algorithm)
        cert = pki.issue_certificate(ca, ca_key, name, key, role="client", days=days)
        (out / "clients" / name).mkdir(mode=0o700)
        _write_pair(out / "clients" / name, cert, key)

    pki.write_private(out / "he" / "site.ctx", serialize_site_context(ctx))
    (out / "he" / "server.ctx").write_bytes(serialize_params_only(ctx))
    meta = {
        "federation": federation,
        "server_host": server_host,
        "clients": clients,
        "algorithm": algorithm,
        "days": days,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "ckks": {"params": params.to_dict(), "fingerprint": fingerprint},
    }
    (out / FEDERATION_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def export_bundle(role: str, name: str | None, src: Path, out: Path) -> Path:
    """Write the bundle of the server (``role="server"``) or of site ``name`` into ``out``."""
    src, out = Path(src), Path(out)
    meta = _read_federation(src)
    if role == "server":
        party, tls_dir, ctx_file = "server", src / "server", src / "he" / "server.ctx"
    elif role == "client":
        if name not in meta["clients"]:
            raise KeyMaterialError(
                f"unknown client {name!r} in {src / FEDERATION_JSON}; known clients: {', '.join(meta['clients'])}"
            )
        party, tls_dir, ctx_file = name, src / "clients" / name, src / "he" / "site.ctx"
    else:
        raise ConfigError(f"unknown bundle role {role!r}: use 'server' or 'client'")
    sources = {"ca.crt": src / "ca" / "ca.crt", "tls.crt": tls_dir / "tls.crt",
               "tls.key": tls_dir / "tls.key", "ckks.ctx": ctx_file}
    for path in sources.values():
        if not path.is_file():
            raise KeyMaterialError(
                f"{path} is missing from the provisioning folder; run `fedfms-secure keys init` again"
            )
    ctx = load_context(ctx_file.read_bytes(), source=str(ctx_file))
    if role == "server" and ctx.has_secret_key():
        raise KeyMaterialError(
            f"{ctx_file} holds the CKKS secret key; the server's context must not: re-run `keys init`"
        )
    if role == "client" and not ctx.has_secret_key():
        raise KeyMaterialError(f"{ctx_file} lacks the CKKS secret key that sites need; re-run `keys init`")

    _refuse_non_empty(out, flag="--out")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = {"tls.key"} | ({"ckks.ctx"} if role == "client" else set())
    digests = {}
    for filename, path in sources.items():
        data = path.read_bytes()
        if filename in secret:
            pki.write_private(out / filename, data)
        else:
            (out / filename).write_bytes(data)
        digests[filename] = hashlib.sha256(data).hexdigest()
    manifest = {
        "role": role,
        "name": party,
        "federation": meta["federation"],
        "server_host": meta["server_host"],
        "clients": meta["clients"],
        "ckks": {**meta["ckks"], "has_secret_key": role == "client"},
        "files": digests,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _write_pair(folder: Path, cert: Any, key: pki.PrivateKey) -> None:
    (folder / "tls.crt").write_bytes(pki.pem_cert(cert))
    pki.write_private(folder / "tls.key", pki.pem_private_key(key))


def _refuse_non_empty(out: Path, *, flag: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KeyMaterialError(f"{out} already exists and is not empty: use another {flag} or delete it")


def _read_federation(src: Path) -> dict[str, Any]:
    path = src / FEDERATION_JSON
    redo = "run `fedfms-secure keys init` again"
    meta = read_json_object(
        path,
        ("federation", "server_host", "clients", "ckks"),
        missing=f"{path} does not exist: {src} is not a provisioning folder; create one with `fedfms-secure keys init`",
        remedy=redo,
    )
    clients, ckks = meta["clients"], meta["ckks"]
    if not isinstance(clients, list) or not all(isinstance(c, str) for c in clients):
        raise KeyMaterialError(f"{path}: clients {clients!r} is not a list of site names; {redo}")
    if not isinstance(ckks, dict) or "params" not in ckks or "fingerprint" not in ckks:
        raise KeyMaterialError(f"{path}: ckks is not an object with params and fingerprint; {redo}")
    return meta
