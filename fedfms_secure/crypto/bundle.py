"""A party's key bundle (made by ``keystore.export_bundle``), loaded and checked before use.

``load_bundle(path, role=...)`` refuses, with a KeyMaterialError that names the file and says what
to do: a missing folder or file, an unreadable manifest, a bundle of the other role, a file whose
SHA-256 differs from the manifest, a private key readable by others, a certificate not issued by
the bundle's CA (or expired, or whose key does not match), a server context holding the CKKS
secret key, and a client context without it or with another fingerprint than the manifest's.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenseal as ts

from fedfms_secure.crypto import pki
from fedfms_secure.crypto.ckks import CkksParams, context_fingerprint, load_context, params_of
from fedfms_secure.errors import ConfigError, KeyMaterialError

MANIFEST = "manifest.json"
FILES = ("ca.crt", "tls.crt", "tls.key", "ckks.ctx")
_EXPORT_HINT = {
    "server": "`fedfms-secure keys export server`",
    "client": "`fedfms-secure keys export client <site-name>`",
}


@dataclass(frozen=True)
class Bundle:
    """Everything one party needs: TLS material, the CKKS context bytes and federation facts."""

    path: Path
    role: str
    name: str
    federation: str
    server_host: str
    clients: tuple[str, ...]
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    context_bytes: bytes
    fingerprint: str
    params: CkksParams

    def context(self) -> ts.Context:
        """A fresh TenSEAL context from ``ckks.ctx`` (params-only for the server)."""
        return load_context(self.context_bytes, source=str(self.path / "ckks.ctx"))


def load_bundle(path: Path, *, role: str) -> Bundle:
    """Load and verify the bundle at ``path`` for ``role`` ("server" or "client")."""
    if role not in _EXPORT_HINT:
        raise ConfigError(f"unknown bundle role {role!r}: use 'server' or 'client'")
    path = Path(path)
    hint = _EXPORT_HINT[role]
    if not path.is_dir():
        raise KeyMaterialError(f"bundle folder {path} does not exist; create it with {hint}")
    manifest = _read_manifest(path, hint)
    if manifest["role"] != role:
        raise KeyMaterialError(
            f"{path} is a {manifest['role']} bundle (for {manifest['name']!r}), but the {role} needs one made by {hint}"
        )
    data = {name: _read_checked(path, name, manifest["files"], hint) for name in FILES}
    secret_files = ("tls.key", "ckks.ctx") if role == "client" else ("tls.key",)
    for name in secret_files:
        mode = stat.S_IMODE((path / name).stat().st_mode)
        if mode & 0o077:
            raise KeyMaterialError(
                f"{path / name} is readable by others (mode {mode:o}); run `chmod 600 {path / name}`"
            )

    _check_tls(path, data, role, manifest["name"])
    params = _check_context(path, data["ckks.ctx"], role, manifest["ckks"])
    return Bundle(
        path=path,
        role=role,
        name=manifest["name"],
        federation=manifest["federation"],
        server_host=manifest["server_host"],
        clients=tuple(manifest["clients"]),
        ca_pem=data["ca.crt"],
        cert_pem=data["tls.crt"],
        key_pem=data["tls.key"],
        context_bytes=data["ckks.ctx"],
        fingerprint=manifest["ckks"]["fingerprint"],
        params=params,
    )


def _read_manifest(path: Path, hint: str) -> dict[str, Any]:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
        for key in ("role", "name", "federation", "server_host", "clients", "ckks", "files"):
            manifest[key]
        for key in ("params", "fingerprint", "has_secret_key"):
            manifest["ckks"][key]
        if not isinstance(manifest["files"], dict):
            raise TypeError("'files' is not a mapping")
        return manifest
    except FileNotFoundError:
        raise KeyMaterialError(f"{file} is missing: {path} is not a bundle; create one with {hint}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyMaterialError(
            f"{file} is unreadable or incomplete ({exc!r}); export the bundle again with {hint}"
        ) from None


def _read_checked(path: Path, name: str, digests: dict[str, str], hint: str) -> bytes:
    file = path / name
    if not file.is_file():
        raise KeyMaterialError(f"{file} is missing from the bundle; export the bundle again with {hint}")
    if name not in digests:
        raise KeyMaterialError(
            f"{path / MANIFEST} lists no checksum for {name}; export the bundle again with {hint}"
        )
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != digests[name]:
        raise KeyMaterialError(
            f"{file} does not match the checksum in {MANIFEST}: it was modified or replaced after export; "
            f"export the bundle again with {hint}"
        )
    return data


def _check_tls(path: Path, data: dict[str, bytes], role: str, name: str) -> None:
    ca = pki.cert_from_pem(data["ca.crt"], source=str(path / "ca.crt"))
    cert = pki.cert_from_pem(data["tls.crt"], source=str(path / "tls.crt"))
    key = pki.private_key_from_pem(data["tls.key"], source=str(path / "tls.key"))
    pki.verify_issued_by(cert, ca, source=str(path / "tls.crt"))
    if not pki.key_matches_cert(key, cert):
        raise KeyMaterialError(
            f"{path / 'tls.key'} is not the private key of {path / 'tls.crt'}; export the bundle again"
        )
    if role == "client" and pki.common_name(cert) != name:
        raise KeyMaterialError(
            f"{path / 'tls.crt'} is issued to {pki.common_name(cert)!r}, but the manifest names site {name!r}"
        )


def _check_context(path: Path, raw: bytes, role: str, ckks: dict[str, Any]) -> CkksParams:
    file = path / "ckks.ctx"
    ctx = load_context(raw, source=str(file))
    if role == "server" and ctx.has_secret_key():
        raise KeyMaterialError(
            f"REFUSING {file}: the server's CKKS context holds the SECRET KEY, which would let the server decrypt "
            "every site's update. Delete this bundle and export a new one with `fedfms-secure keys export server`"
        )
    if role == "client":
        if not ctx.has_secret_key():
            raise KeyMaterialError(
                f"{file} has no CKKS secret key, so this site could not decrypt the aggregate (is it the server's "
                "params-only context?); export the bundle again with `fedfms-secure keys export client <site-name>`"
            )
        if context_fingerprint(ctx) != ckks["fingerprint"]:
            raise KeyMaterialError(
                f"{file} has fingerprint {context_fingerprint(ctx)[:16]}..., the manifest says "
                f"{str(ckks['fingerprint'])[:16]}...: the context belongs to another federation; export the bundle again"
            )
    params = CkksParams.from_dict(ckks["params"])
    if params_of(ctx) != params:
        raise KeyMaterialError(
            f"{file} has CKKS parameters {params_of(ctx).to_dict()}, the manifest says {params.to_dict()}"
        )
    return params
