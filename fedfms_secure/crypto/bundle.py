"""A party's key bundle (made by ``keystore.export_bundle``), loaded and checked before use.

``load_bundle(path, role=...)`` refuses, with a KeyMaterialError that names the file and says what
to do: a missing folder or file; an unreadable or malformed manifest (every field is type-checked:
valid CKKS parameters, a 64-hex-digit fingerprint, ``has_secret_key`` matching the role, a list of
client names); a bundle of the other role; a file whose SHA-256 differs from the manifest; a
private key readable by others; a certificate not issued by the bundle's CA (or expired, or whose
key does not match); a server context holding the CKKS secret key; and a client context without
it or with another fingerprint than the manifest's.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tenseal as ts

from fedfms_secure.crypto import pki
from fedfms_secure.crypto._jsonfile import read_json_object
from fedfms_secure.crypto.ckks import CkksParams, context_fingerprint, is_fingerprint, load_context, params_of
from fedfms_secure.errors import ConfigError, KeyMaterialError

MANIFEST = "manifest.json"
FILES = ("ca.crt", "tls.crt", "tls.key", "ckks.ctx")
_EXPORT_HINT = {
    "server": "`fedfms-secure keys export server`",
    "client": "`fedfms-secure keys export client <site-name>`",
}


@dataclass(frozen=True)
class Bundle:
    """Everything one party needs: TLS material, the CKKS context bytes and federation facts.

    ``key_pem`` (the TLS private key) and ``context_bytes`` (a site's holds the CKKS secret key)
    are left out of ``repr`` so that logging a bundle never leaks them.
    """

    path: Path
    role: str
    name: str
    federation: str
    server_host: str
    clients: tuple[str, ...]
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    context_bytes: bytes = field(repr=False)
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
    manifest, params = _read_manifest(path, hint)
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
    _check_context(path, data["ckks.ctx"], role, manifest["ckks"]["fingerprint"], params)
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


def _read_manifest(path: Path, hint: str) -> tuple[dict[str, Any], CkksParams]:
    """The manifest, every field type-checked, and its CKKS parameters."""
    file = path / MANIFEST
    redo = f"export the bundle again with {hint}"
    manifest = read_json_object(
        file,
        ("role", "name", "federation", "server_host", "clients", "ckks", "files"),
        missing=f"{file} is missing: {path} is not a bundle; create one with {hint}",
        remedy=redo,
    )

    def bad(what: str) -> KeyMaterialError:
        return KeyMaterialError(f"{file}: {what}; {redo}")

    if manifest["role"] not in _EXPORT_HINT:
        raise bad(f"role {manifest['role']!r} is neither 'server' nor 'client'")
    for key in ("name", "federation", "server_host"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise bad(f"{key} {manifest[key]!r} is not a non-empty string")
    clients = manifest["clients"]
    if not isinstance(clients, list) or not all(isinstance(c, str) and c for c in clients):
        raise bad(f"clients {clients!r} is not a list of site names")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise bad("files is not a mapping of file names to SHA-256 checksums")
    ckks = manifest["ckks"]
    if not isinstance(ckks, dict) or any(k not in ckks for k in ("params", "fingerprint", "has_secret_key")):
        raise bad("ckks is not an object with params, fingerprint and has_secret_key")
    if not is_fingerprint(ckks["fingerprint"]):
        raise bad(f"ckks.fingerprint {ckks['fingerprint']!r} is not a context fingerprint (64 lowercase hex digits)")
    if ckks["has_secret_key"] is not (manifest["role"] == "client"):
        raise bad(
            f"ckks.has_secret_key is {ckks['has_secret_key']!r} in a {manifest['role']} bundle (a client's context "
            "holds the CKKS secret key, the server's never does)"
        )
    if not isinstance(ckks["params"], dict):
        raise bad(f"ckks.params {ckks['params']!r} is not an object")
    try:
        params = CkksParams.from_dict(ckks["params"])
    except ConfigError as exc:
        raise bad(f"ckks.params are invalid ({exc})") from None
    return manifest, params


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


def _check_context(path: Path, raw: bytes, role: str, fingerprint: str, params: CkksParams) -> None:
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
        if context_fingerprint(ctx) != fingerprint:
            raise KeyMaterialError(
                f"{file} has fingerprint {context_fingerprint(ctx)[:16]}..., the manifest says "
                f"{fingerprint[:16]}...: the context belongs to another federation; export the bundle again"
            )
    try:
        actual = params_of(ctx)
    except ConfigError as exc:
        raise KeyMaterialError(
            f"{file} holds CKKS parameters this build refuses ({exc}); export the bundle again"
        ) from None
    if actual != params.ring:  # the packing (if any) lives in the manifest only
        raise KeyMaterialError(
            f"{file} has CKKS parameters {actual.to_dict()}, the manifest says {params.ring.to_dict()}; "
            "export the bundle again"
        )
