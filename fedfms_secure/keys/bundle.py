"""A party's key bundle (made by ``export.export_bundle``), loaded and checked before use.

A bundle folder holds ``ca.crt``, ``tls.crt``, ``tls.key`` (0600) and ``manifest.json``; the
server's also ``ckks.ctx`` (CKKS parameters only, never a key) and, once a certificate has been
revoked, ``crl.pem``; a site's also ``envelope.key`` (0600, its X25519 key for sealed envelopes)
and, only when the provisioning host dealt the CKKS key (``he_dealer=True``), ``ckks.ctx`` with
the CKKS secret key (0600). Without a dealer the site gets its CKKS secret key later, generated at
a site (``fedfms-secure keys he-init``) and sealed to it.

The manifest::

    {role, name, federation, server_host, clients (the active sites),
     ckks: {params, params_fingerprint, source: "dealer" | "site", has_secret_key,
            fingerprint (dealer only: the context's)},
     envelope_keys: {site: 64 hex digits of its raw X25519 public key},
     files: {filename: sha256}}

``crl.pem`` is not in ``files`` (it changes while the server runs): it is trusted by its CA
signature. Private keys may be encrypted with a passphrase; ``load_bundle(...,
passphrase=...)`` decrypts them in memory (``Bundle.key_pem`` is then the unencrypted PEM that
gRPC needs; the file on disk stays encrypted).

``load_bundle(path, role=...)`` refuses, with a KeyMaterialError that names the file and says what
to do: a missing folder or file; an unreadable or malformed manifest (every field is type-checked:
valid CKKS parameters, a 64-hex-digit fingerprint, ``has_secret_key`` matching the role and the
key's source, a list of client names, envelope keys); a bundle of the other role; a file whose
SHA-256 differs from the manifest; a private key readable by others; an encrypted key without its
passphrase or with a wrong one; a certificate not issued by the bundle's CA (or expired, or whose
key does not match); an envelope key that is not the one the manifest (and the certificate)
names; a server context holding the CKKS secret key; and a client context without it or with
another fingerprint than the manifest's.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tenseal as ts
from cryptography.hazmat.primitives.asymmetric import x25519

from fedfms_secure.keys import pki
from fedfms_secure.keys._jsonfile import read_json_object
from fedfms_secure.he.ckks import CkksParams, context_fingerprint, is_fingerprint, load_context, params_of
from fedfms_secure.errors import ConfigError, KeyMaterialError

MANIFEST = "manifest.json"
CRL = "crl.pem"
ENVELOPE_KEY = "envelope.key"
FILES = ("ca.crt", "tls.crt", "tls.key", "ckks.ctx")
HE_SOURCES = ("dealer", "site")
_PARAMS_DOMAIN = b"fedfms-secure/ckks-params/v1\x00"
_EXPORT_HINT = {
    "server": "`fedfms-secure keys export server`",
    "client": "`fedfms-secure keys export client <site-name>`",
}


def params_fingerprint(params: CkksParams) -> str:
    """SHA-256 (hex) of the canonical JSON of ``params`` (ring and packing): what every party of
    the federation must agree on before any key exists."""
    canonical = json.dumps(params.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(_PARAMS_DOMAIN + canonical).hexdigest()


def bundle_files(role: str, he_source: str) -> tuple[str, ...]:
    """The files a bundle of ``role`` holds (besides ``manifest.json`` and an optional ``crl.pem``)."""
    if role == "server":
        return FILES
    return ("ca.crt", "tls.crt", "tls.key", ENVELOPE_KEY) + (("ckks.ctx",) if he_source == "dealer" else ())


def private_files(role: str, he_source: str) -> tuple[str, ...]:
    """The files of a bundle that must be readable by their owner only (mode 0600)."""
    if role == "server":
        return ("tls.key",)
    return ("tls.key", ENVELOPE_KEY) + (("ckks.ctx",) if he_source == "dealer" else ())


@dataclass(frozen=True)
class Bundle:
    """Everything one party needs: TLS material, the CKKS context bytes and federation facts.

    ``key_pem`` (the TLS private key, decrypted) and ``context_bytes`` (a dealer-made site context
    holds the CKKS secret key) are left out of ``repr`` so that logging a bundle never leaks them.
    ``context_bytes`` is None in a site's bundle when the CKKS key is generated at a site
    (``he_source == "site"``); ``fingerprint`` (the context's) is then None as well: the key does
    not exist yet when the bundle is made. ``envelope_keys`` are the raw X25519 public keys of the
    federation's sites, for sealing the CKKS key to each of them.
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
    context_bytes: bytes | None = field(repr=False)
    fingerprint: str | None
    params: CkksParams
    envelope_keys: dict[str, bytes] = field(default_factory=dict)
    he_source: str = "dealer"
    params_fingerprint: str = ""

    @property
    def has_he_secret(self) -> bool:
        """Whether this bundle itself holds the CKKS secret key (a site's, dealer mode only)."""
        return self.role == "client" and self.context_bytes is not None

    def context(self) -> ts.Context:
        """A fresh TenSEAL context from ``ckks.ctx`` (params-only for the server)."""
        if self.context_bytes is None:
            raise KeyMaterialError(
                f"{self.path} holds no CKKS context: this federation's CKKS key is generated at a site "
                "(`fedfms-secure keys he-init`) and reaches every site sealed to its envelope key"
            )
        return load_context(self.context_bytes, source=str(self.path / "ckks.ctx"))


def load_bundle(path: Path, *, role: str, passphrase: bytes | None = None) -> Bundle:
    """Load and verify the bundle at ``path`` for ``role`` ("server" or "client").

    ``passphrase`` decrypts private keys encrypted at rest (``keys init --passphrase-file``).
    """
    if role not in _EXPORT_HINT:
        raise ConfigError(f"unknown bundle role {role!r}: use 'server' or 'client'")
    path = Path(path)
    hint = _EXPORT_HINT[role]
    if not path.is_dir():
        raise KeyMaterialError(f"bundle folder {path} does not exist; create it with {hint}")
    manifest, params = read_manifest(path, hint)
    if manifest["role"] != role:
        raise KeyMaterialError(
            f"{path} is a {manifest['role']} bundle (for {manifest['name']!r}), but the {role} needs one made by {hint}"
        )
    source = manifest["ckks"]["source"]
    names = bundle_files(role, source)
    unexpected = sorted(set(manifest["files"]) - set(names))
    if unexpected:
        raise KeyMaterialError(
            f"{path / MANIFEST} lists {', '.join(unexpected)}, which a {role} bundle whose CKKS key comes from the "
            f"{source} must not hold; export the bundle again with {hint}"
        )
    data = {name: _read_envelope_key(path, manifest, hint) if name == ENVELOPE_KEY
            else _read_checked(path, name, manifest["files"], hint) for name in names}
    for name in private_files(role, source):
        mode = stat.S_IMODE((path / name).stat().st_mode)
        if mode & 0o077:
            raise KeyMaterialError(
                f"{path / name} is readable by others (mode {mode:o}); run `chmod 600 {path / name}`"
            )

    envelope_keys = {site: bytes.fromhex(hexkey) for site, hexkey in manifest["envelope_keys"].items()}
    key = _check_tls(path, data, role, manifest["name"], passphrase, envelope_keys)
    if role == "client":
        _check_envelope_key(path, data[ENVELOPE_KEY], manifest["name"], envelope_keys, passphrase)
    fingerprint = manifest["ckks"].get("fingerprint")
    if "ckks.ctx" in data:
        _check_context(path, data["ckks.ctx"], role, fingerprint, params)
    key_pem = data["tls.key"] if not pki.is_encrypted_pem(data["tls.key"]) else pki.pem_private_key(key)
    return Bundle(
        path=path,
        role=role,
        name=manifest["name"],
        federation=manifest["federation"],
        server_host=manifest["server_host"],
        clients=tuple(manifest["clients"]),
        ca_pem=data["ca.crt"],
        cert_pem=data["tls.crt"],
        key_pem=key_pem,
        context_bytes=data.get("ckks.ctx"),
        fingerprint=fingerprint,
        params=params,
        envelope_keys=envelope_keys,
        he_source=source,
        params_fingerprint=manifest["ckks"]["params_fingerprint"],
    )


def load_envelope_key(bundle_dir: Path, passphrase: bytes | None = None) -> x25519.X25519PrivateKey:
    """The site's X25519 private key for opening sealed envelopes, from its client bundle.

    Checks the file against the manifest's checksum, its mode (0600) and that its public half is
    the one the manifest lists for this site; KeyMaterialError naming the file otherwise.
    """
    path = Path(bundle_dir)
    hint = _EXPORT_HINT["client"]
    if not path.is_dir():
        raise KeyMaterialError(f"bundle folder {path} does not exist; create it with {hint}")
    manifest, _ = read_manifest(path, hint)
    if manifest["role"] != "client":
        raise KeyMaterialError(f"{path} is a {manifest['role']} bundle: only a site's bundle holds an envelope key")
    raw = _read_envelope_key(path, manifest, hint)
    mode = stat.S_IMODE((path / ENVELOPE_KEY).stat().st_mode)
    if mode & 0o077:
        raise KeyMaterialError(
            f"{path / ENVELOPE_KEY} is readable by others (mode {mode:o}); run `chmod 600 {path / ENVELOPE_KEY}`"
        )
    keys = {site: bytes.fromhex(hexkey) for site, hexkey in manifest["envelope_keys"].items()}
    return _check_envelope_key(path, raw, manifest["name"], keys, passphrase)


def read_manifest(path: Path, hint: str = _EXPORT_HINT["client"]) -> tuple[dict[str, Any], CkksParams]:
    """The manifest of the bundle at ``path``, every field type-checked, and its CKKS parameters.

    Manifests of older bundles without ``ckks.source`` or ``ckks.params_fingerprint`` read as a
    dealer-made key and the parameters' fingerprint; one without ``envelope_keys`` as none (a site's
    bundle is then refused: it must hold its own envelope key).
    """
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
    if not isinstance(ckks, dict) or any(k not in ckks for k in ("params", "has_secret_key")):
        raise bad("ckks is not an object with params and has_secret_key")
    ckks = manifest["ckks"] = dict(ckks)
    source = ckks.setdefault("source", "dealer")
    if source not in HE_SOURCES:
        raise bad(f"ckks.source {source!r} is neither 'dealer' nor 'site'")
    if source == "dealer":
        if not is_fingerprint(ckks.get("fingerprint")):
            raise bad(f"ckks.fingerprint {ckks.get('fingerprint')!r} is not a context fingerprint "
                      "(64 lowercase hex digits)")
        if ckks["has_secret_key"] is not (manifest["role"] == "client"):
            raise bad(
                f"ckks.has_secret_key is {ckks['has_secret_key']!r} in a {manifest['role']} bundle (a client's context "
                "holds the CKKS secret key, the server's never does)"
            )
    else:
        if ckks["has_secret_key"] is not False:
            raise bad(f"ckks.has_secret_key is {ckks['has_secret_key']!r}, but with source 'site' no bundle holds "
                      "the CKKS secret key (it is generated at a site with `keys he-init`)")
        if ckks.get("fingerprint") is not None:
            raise bad("ckks.fingerprint is set, but with source 'site' no context exists when the bundle is made")
    if not isinstance(ckks["params"], dict):
        raise bad(f"ckks.params {ckks['params']!r} is not an object")
    try:
        params = CkksParams.from_dict(ckks["params"])
    except ConfigError as exc:
        raise bad(f"ckks.params are invalid ({exc})") from None
    expected = params_fingerprint(params)
    if ckks.setdefault("params_fingerprint", expected) != expected:
        raise bad(f"ckks.params_fingerprint {str(ckks['params_fingerprint'])[:16]}... does not match ckks.params "
                  f"({expected[:16]}...)")
    keys = manifest.setdefault("envelope_keys", {})
    if not isinstance(keys, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _is_hex(v, 64) for k, v in keys.items()
    ):
        raise bad("envelope_keys is not a mapping of site names to 64 hex digits (raw X25519 public keys)")
    if manifest["role"] == "client" and manifest["name"] not in keys:
        raise bad(f"envelope_keys lacks this site's own key ({manifest['name']!r})")
    if "envelope_key_source" in manifest and (manifest["role"] != "client" or manifest["envelope_key_source"] != "site"):
        raise bad(f"envelope_key_source {manifest['envelope_key_source']!r} is not 'site' in a client bundle")
    return manifest, params


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def site_made_envelope_key(manifest: dict[str, Any]) -> bool:
    """Whether the site of this client manifest made its envelope key itself (``keys envelope-key``)."""
    return manifest.get("envelope_key_source") == "site"


SITE_MADE_ENVELOPE_KEY_MISSING = (
    f"this site made its envelope key itself (`fedfms-secure keys envelope-key`), so its bundle comes without it; "
    f"copy that key file here as {ENVELOPE_KEY} (mode 0600)"
)


def _read_envelope_key(path: Path, manifest: dict[str, Any], hint: str) -> bytes:
    """A site bundle's ``envelope.key``. One the site made itself was never on the provisioning host,
    so the manifest has no checksum of it: it is checked against the certified public key instead."""
    if not site_made_envelope_key(manifest):
        return _read_checked(path, ENVELOPE_KEY, manifest["files"], hint)
    file = path / ENVELOPE_KEY
    if not file.is_file():
        raise KeyMaterialError(f"{file} is missing: {SITE_MADE_ENVELOPE_KEY_MISSING}")
    return file.read_bytes()


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


def _check_tls(
    path: Path, data: dict[str, bytes], role: str, name: str, passphrase: bytes | None, envelope_keys: dict[str, bytes]
) -> pki.PrivateKey:
    ca = pki.cert_from_pem(data["ca.crt"], source=str(path / "ca.crt"))
    cert = pki.cert_from_pem(data["tls.crt"], source=str(path / "tls.crt"))
    key = pki.private_key_from_pem(data["tls.key"], source=str(path / "tls.key"), passphrase=passphrase)
    pki.verify_issued_by(cert, ca, source=str(path / "tls.crt"))
    if not pki.key_matches_cert(key, cert):
        raise KeyMaterialError(
            f"{path / 'tls.key'} is not the private key of {path / 'tls.crt'}; export the bundle again"
        )
    if role == "client":
        if pki.common_name(cert) != name:
            raise KeyMaterialError(
                f"{path / 'tls.crt'} is issued to {pki.common_name(cert)!r}, but the manifest names site {name!r}"
            )
        certified = pki.envelope_key_of(cert)
        if certified is not None and certified != envelope_keys.get(name):
            raise KeyMaterialError(
                f"the envelope key the CA certified in {path / 'tls.crt'} differs from the manifest's for {name!r}; "
                "export the bundle again"
            )
    return key


def _check_envelope_key(
    path: Path, raw: bytes, name: str, envelope_keys: dict[str, bytes], passphrase: bytes | None
) -> x25519.X25519PrivateKey:
    key = pki.envelope_key_from_pem(raw, source=str(path / ENVELOPE_KEY), passphrase=passphrase)
    if pki.raw_public(key) != envelope_keys.get(name):
        raise KeyMaterialError(
            f"{path / ENVELOPE_KEY} is not the envelope key that {path / MANIFEST} lists for site {name!r}; "
            "export the bundle again with `fedfms-secure keys export client <site-name>`"
        )
    return key


def _check_context(path: Path, raw: bytes, role: str, fingerprint: str | None, params: CkksParams) -> None:
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
                f"{str(fingerprint)[:16]}...: the context belongs to another federation; export the bundle again"
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
