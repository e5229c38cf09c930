"""The provisioning folder: ``federation.json``, party names, and how its files are written.

Shared by ``provision`` (create, add a site), ``lifecycle`` (revoke, rotate, CRL) and ``export``.
The folder's layout is documented in ``provision``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import x25519

from fedfms_secure.atomic import write_atomic
from fedfms_secure.errors import ConfigError, KeyMaterialError
from fedfms_secure.keys import pki
from fedfms_secure.keys._jsonfile import read_json_object

FEDERATION_JSON = "federation.json"
DEFAULT_DAYS = 365
DEFAULT_CA_DAYS = 3650
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# what to do about a damaged file of the provisioning folder (exporting again would copy it)
RESTORE = "restore it from a backup of the provisioning folder, or provision again with `fedfms-secure keys init`"


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


def check_algorithms(algorithm: str, ca_algorithm: str) -> None:
    """ConfigError unless gRPC can use leaf keys of ``algorithm`` under a CA of ``ca_algorithm``."""
    if algorithm == "ed25519":
        raise ConfigError(
            "key algorithm 'ed25519' cannot be used for TLS keys: gRPC's TLS (BoringSSL) aborts the handshake "
            "with an Ed25519 server or site key (NO_COMMON_SIGNATURE_ALGORITHMS). What works: ecdsa-p256 keys, "
            "under an ecdsa-p256 or an Ed25519 CA (--algorithm ecdsa-p256 --ca-algorithm ed25519)"
        )
    if algorithm not in pki.LEAF_ALGORITHMS:
        raise ConfigError(f"unknown key algorithm {algorithm!r}: use {', '.join(pki.LEAF_ALGORITHMS)}")
    if ca_algorithm not in pki.CA_ALGORITHMS:
        raise ConfigError(f"unknown CA key algorithm {ca_algorithm!r}: use one of {', '.join(pki.CA_ALGORITHMS)}")


def check_envelope_public(public: bytes, *, what: str) -> bytes:
    """A raw X25519 public key (32 bytes), else ConfigError saying how to make one."""
    remedy = "make one at the site with `fedfms-secure keys envelope-key --out envelope.key` and pass its .pub file"
    if not isinstance(public, bytes) or len(public) != 32:
        raise ConfigError(f"{what} is not a raw X25519 public key (32 bytes, 64 hex digits): {remedy}")
    try:  # a low-order point gives no shared secret: sealing to it would fail at he-init for everyone
        x25519.X25519PrivateKey.generate().exchange(x25519.X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise ConfigError(f"{what} is not a usable X25519 public key (a low-order point): {remedy}") from None
    return public



# --- the provisioning folder ---------------------------------------------------------------------
def read_federation(src: Path) -> dict[str, Any]:
    """``federation.json`` of a provisioning folder, checked; KeyMaterialError naming it otherwise."""
    src = Path(src)
    path = src / FEDERATION_JSON
    redo = "restore it from a backup, or provision again with `fedfms-secure keys init`"
    meta = read_json_object(
        path,
        ("federation", "server_host", "clients", "ckks", "algorithm"),
        missing=f"{path} does not exist: {src} is not a provisioning folder; create one with `fedfms-secure keys init`",
        remedy=redo,
    )
    clients, ckks = meta["clients"], meta["ckks"]
    if not isinstance(clients, list) or not all(isinstance(c, str) for c in clients):
        raise KeyMaterialError(f"{path}: clients {clients!r} is not a list of site names; {redo}")
    if not isinstance(ckks, dict) or "params" not in ckks:
        raise KeyMaterialError(f"{path}: ckks is not an object with params; {redo}")
    if ckks.get("source", "dealer") == "dealer" and "fingerprint" not in ckks:
        raise KeyMaterialError(f"{path}: ckks has no fingerprint of the dealt context; {redo}")
    meta.setdefault("envelope_keys", {})
    meta.setdefault("revocations", [])
    if not isinstance(meta["envelope_keys"], dict) or not isinstance(meta["revocations"], list):
        raise KeyMaterialError(f"{path}: envelope_keys must be an object and revocations a list; {redo}")
    return meta


def revoked_sites(src: Path) -> dict[str, dict[str, Any]]:
    """The sites removed by ``revoke``, with their revocation record."""
    return revoked_in(read_federation(src))


def revoked_in(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["site"]: r for r in meta["revocations"] if isinstance(r, dict) and r.get("removes_site")}


def active_sites(meta: dict[str, Any]) -> list[str]:
    revoked = revoked_in(meta)
    return [c for c in meta["clients"] if c not in revoked]


def need_passphrase(src: Path, meta: dict[str, Any], passphrase: bytes | None) -> None:
    """ConfigError when the federation's keys are encrypted but no passphrase was given: a new key
    would otherwise be written in the clear next to encrypted ones (even when ``ca.key`` is not)."""
    if meta.get("encrypted") and not passphrase:
        raise ConfigError(
            f"the private keys of this federation are encrypted with a passphrase ({src / FEDERATION_JSON}: "
            "encrypted): give it with --passphrase-file, so that the new keys are encrypted too"
        )


def load_ca(src: Path, passphrase: bytes | None) -> tuple[x509.Certificate, pki.PrivateKey]:
    ca = pki.load_cert(src / "ca" / "ca.crt", remedy=RESTORE)
    key = pki.load_private_key(src / "ca" / "ca.key", passphrase, remedy=RESTORE)
    if not pki.key_matches_cert(key, ca):
        raise KeyMaterialError(f"{src / 'ca' / 'ca.key'} is not the key of {src / 'ca' / 'ca.crt'}; restore both "
                               "from the same backup")
    return ca, key


def write_pair(folder: Path, cert: Any, key: pki.PrivateKey, passphrase: bytes | None = None) -> None:
    pki.write_private(folder / "tls.key", pki.pem_private_key(key, passphrase))
    write_public(folder / "tls.crt", pki.pem_cert(cert))


def write_public(path: Path, data: bytes) -> None:
    """Write a file others may read (mode 0644), atomically: readers see the old or the new one."""
    write_atomic(path, data, mode=0o644)


def write_federation(src: Path, meta: dict[str, Any]) -> None:
    write_public(src / FEDERATION_JSON, (json.dumps(meta, indent=2) + "\n").encode())


def refuse_non_empty(out: Path, *, flag: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KeyMaterialError(f"{out} already exists and is not empty: use another {flag} or delete it")
