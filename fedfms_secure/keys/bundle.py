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
names; in a site bundle, an envelope key listed for another site that its CA-signed certificate in
``peers/`` does not certify (the site would seal the CKKS key to it); a server context holding the CKKS secret key; and a client context without it or with
another fingerprint than the manifest's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tenseal as ts
from cryptography.hazmat.primitives.asymmetric import x25519

from fedfms_secure.keys import pki, rules
from fedfms_secure.keys._jsonfile import read_json_object
from fedfms_secure.keys.rules import (
    CRL,
    ENVELOPE_KEY,
    MANIFEST,
    bundle_files,
    private_files,
)
from fedfms_secure.he.ckks import CkksParams, is_fingerprint, load_context
from fedfms_secure.errors import ConfigError, KeyMaterialError

# the bundle's file names are the rules' (server and site code import them from here)
__all__ = ["CRL", "ENVELOPE_KEY", "MANIFEST", "Bundle", "load_bundle", "load_envelope_key", "params_fingerprint",
           "read_manifest", "sealing_keys"]

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
    rules.check_listed_files(path, manifest)
    data = {name: rules.read_file(path, name, manifest) for name in bundle_files(role, source)}
    for name in private_files(role, source):
        rules.check_private_mode(path / name)
    ca = rules.parse_cert(path / "ca.crt", data["ca.crt"], manifest)
    cert = rules.parse_cert(path / "tls.crt", data["tls.crt"], manifest)
    rules.check_chain(path, ca, cert, manifest)
    if role == "client":
        rules.check_site_cert(path, cert, manifest)
    key = rules.load_tls_key(path, data["tls.key"], cert, passphrase, manifest)
    if role == "client":
        rules.check_envelope_key(path, data[ENVELOPE_KEY], passphrase, manifest)
    if "ckks.ctx" in data:
        rules.check_context(path / "ckks.ctx", data["ckks.ctx"], manifest, params)
    envelope_keys = {site: bytes.fromhex(hexkey) for site, hexkey in manifest["envelope_keys"].items()}
    if role == "client":  # every key this site seals the CKKS key to is the CA's word, not the manifest's
        envelope_keys = {**rules.certified_envelope_keys(path, ca, manifest),
                         manifest["name"]: envelope_keys[manifest["name"]]}
    fingerprint = manifest["ckks"].get("fingerprint")
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
    raw = rules.read_file(path, ENVELOPE_KEY, manifest)
    rules.check_private_mode(path / ENVELOPE_KEY)
    return rules.check_envelope_key(path, raw, passphrase, manifest)


def sealing_keys(bundle: Bundle, sites: set[str]) -> dict[str, bytes]:
    """The envelope public keys of ``sites`` (other than this one) to seal the CKKS key to, checked
    again now against the CA-signed certificates in the bundle's ``peers/`` (not only at load).

    A site of ``sites`` that the bundle lists no key for gets none (it is skipped, as before); a
    listed key the CA did not certify raises ``BundleProblem`` and nothing is sealed.
    """
    manifest, _ = read_manifest(bundle.path, _EXPORT_HINT["client"])
    ca = pki.cert_from_pem(bundle.ca_pem, source=str(bundle.path / "ca.crt"))
    certified = rules.certified_envelope_keys(bundle.path, ca, manifest)
    for site, key in bundle.envelope_keys.items():
        if site in sites and site != bundle.name and certified.get(site) != key:
            raise KeyMaterialError(
                f"the envelope key of site {site!r} in {bundle.path} changed since the bundle was loaded and is not "
                f"the one its certificate in {rules.PEERS_DIR}/ holds: REFUSING to seal to it; restart with a bundle "
                "exported by `fedfms-secure keys export client NAME --update`"
            )
    return {site: key for site, key in certified.items() if site in sites and site != bundle.name}


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
