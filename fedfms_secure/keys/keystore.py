"""Provisioning: create a federation's key material, change it, and export one bundle per party.

``init_federation(out, ...)`` (``fedfms-secure keys init``) writes the provisioning folder::

    out/federation.json          federation, server_host, clients (every site ever provisioned),
                                 algorithm, ca_algorithm, days, ca_days, created, encrypted,
                                 ckks {params, params_fingerprint, source, fingerprint (dealer)},
                                 envelope_keys {site: raw X25519 public key, hex},
                                 revocations [...], crl_number
    out/ca/ca.crt                federation CA certificate (default lifetime 10 years)
    out/ca/ca.key         0600   CA private key (keep it offline)
    out/ca/crl.pem               CA-signed revocation list (from the first revocation on)
    out/server/tls.crt, tls.key  server certificate (SANs = server_host, + localhost/127.0.0.1/::1
                                 for a loopback host; default lifetime 1 year) and its key (0600)
    out/clients/<name>/tls.crt, tls.key
                                 one per site: CN = SAN = site name, EKU clientAuth, and the
                                 site's envelope public key in a private extension; key 0600
    out/clients/<name>/envelope.key
                          0600   the site's X25519 key for sealed envelopes (PKCS#8 PEM); absent for a
                                 site that made its own (``keys envelope-key`` there, its public key
                                 passed as ``envelope_publics``; listed in ``site_envelope_keys``):
                                 its bundle is exported without it and the site adds the file
    out/he/server.ctx            CKKS parameters only, no key of any kind (the server's)
    out/he/site.ctx       0600   only with ``he_dealer=True``: CKKS context with the SECRET key

**Where the CKKS secret key comes from.** With ``he_dealer=False`` (what ``keys init`` does) the
provisioning host never holds the federation's CKKS secret key: one site generates it
(``fedfms-secure keys he-init``) and seals a copy to every other site's envelope key; the
server only relays the sealed envelopes. (The params-only ``server.ctx`` is serialized from a
throwaway context whose keys are never written and never used.) ``he_dealer=True`` keeps the
older flow in which the provisioning host creates ``he/site.ctx`` and every site bundle gets a
copy; delete ``out/he/site.ctx`` once the bundles are delivered.

**Algorithms** (measured with grpcio on loopback, see ``pki``): TLS leaf keys are ECDSA P-256;
an Ed25519 leaf key on either end makes gRPC's BoringSSL abort the handshake
(``NO_COMMON_SIGNATURE_ALGORITHMS``), so ``algorithm="ed25519"`` is refused. The CA may be
Ed25519 (``ca_algorithm="ed25519"``): an Ed25519 CA signing P-256 leaves handshakes fine.

**Passphrase.** With ``passphrase`` every private key written (CA, server, sites, envelope keys)
is encrypted with it (PKCS#8 ``BestAvailableEncryption``); commands that sign (add-client, revoke,
rotate-tls) need it to open ``ca.key``, and the daemons need it to open their bundle's keys.

**Changes after init.** ``add_client`` issues a certificate and an envelope key for a new site;
``revoke`` puts a site's certificate on the CA-signed CRL (``ca/crl.pem``) and removes the site
from the federation; ``rotate_tls`` replaces certificates and revokes the old ones as
``superseded``; ``install_crl`` copies the CRL into a server bundle (a running server reloads
it) or a site's (it then refuses envelopes signed by a removed site), never over a newer list.
Then re-export the bundles that changed (``export_bundle(..., update=True)`` rewrites a bundle in
place, keeping the files a site added to it).

``export_bundle(role, name, src, out)`` (``fedfms-secure keys export``) copies what one party needs::

    server: ca.crt  tls.crt  tls.key (0600)  ckks.ctx (params only)  crl.pem (when any)  manifest.json
    client: ca.crt  tls.crt  tls.key (0600)  envelope.key (0600)  ckks.ctx (dealer only, 0600)  crl.pem (when
            any)  manifest.json

``load_bundle`` (in ``bundle.py``, re-exported here) checks a bundle before a daemon uses it.
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
from typing import Any, Mapping

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import x25519

from fedfms_secure.atomic import write_atomic
from fedfms_secure.keys import pki
from fedfms_secure.keys._jsonfile import read_json_object
from fedfms_secure.keys.bundle import (
    CRL,
    ENVELOPE_KEY,
    MANIFEST,
    Bundle,
    load_bundle,
    load_envelope_key,
    params_fingerprint,
    read_manifest,
)
from fedfms_secure.he.ckks import (
    CkksParams,
    context_fingerprint,
    load_context,
    new_secret_context,
    params_of,
    serialize_params_only,
    serialize_site_context,
)
from fedfms_secure.errors import ConfigError, KeyMaterialError

# Bundle, load_bundle and load_envelope_key are re-exported: callers import them from here.
__all__ = [
    "Bundle",
    "add_client",
    "check_crl_target",
    "export_bundle",
    "init_federation",
    "install_crl",
    "load_bundle",
    "load_envelope_key",
    "params_fingerprint",
    "read_federation",
    "revoke",
    "rotate_tls",
    "validate_host",
    "validate_name",
]

FEDERATION_JSON = "federation.json"
DEFAULT_DAYS = 365
DEFAULT_CA_DAYS = 3650
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# what to do about a damaged file of the provisioning folder (exporting again would copy it)
_RESTORE = "restore it from a backup of the provisioning folder, or provision again with `fedfms-secure keys init`"


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


def init_federation(
    out: Path,
    *,
    federation: str,
    server_host: str,
    clients: Sequence[str],
    params: CkksParams = CkksParams(),
    algorithm: str = "ecdsa-p256",
    ca_algorithm: str | None = None,
    days: int = DEFAULT_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
    passphrase: bytes | None = None,
    he_dealer: bool = False,
    envelope_publics: Mapping[str, bytes] | None = None,
) -> Path:
    """Create CA, server and site certificates, envelope keys and the CKKS context(s) under ``out``.

    ``envelope_publics``: ``{site: raw X25519 public key}`` of sites that made their envelope key
    themselves (``keys envelope-key``); this host certifies those and never holds their private key.

    ``days``: lifetime of the server and site certificates; ``ca_days``: the CA's (at least one
    day longer than ``days``). ``ca_algorithm`` defaults to ``algorithm``. ``he_dealer=False``
    (the default): no CKKS secret key is created here (see the module docstring); ``True``: the
    provisioning host makes it and every site bundle gets a copy. Returns ``out``.
    """
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
    ca_algorithm = ca_algorithm or algorithm
    check_algorithms(algorithm, ca_algorithm)
    if days < 1 or ca_days < 1:
        raise ConfigError(f"certificate lifetimes must be at least 1 day (days={days}, ca_days={ca_days})")
    envelope_publics = dict(envelope_publics or {})
    strangers = sorted(set(envelope_publics) - set(clients))
    if strangers:
        raise ConfigError(f"envelope keys given for {', '.join(strangers)}, which are not in the client list")
    for site, public in envelope_publics.items():
        check_envelope_public(public, what=f"the envelope key of {site!r}")
    shared = sorted(s for s, p in envelope_publics.items() if list(envelope_publics.values()).count(p) > 1)
    if shared:
        raise ConfigError(f"sites {', '.join(shared)} were given the same envelope public key: each site makes its own "
                          "with `fedfms-secure keys envelope-key`")

    existed = out.exists()
    try:
        _provision(out, federation, server_host, clients, params, algorithm, ca_algorithm, days,
                   max(ca_days, days + 1), passphrase, he_dealer, envelope_publics)
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
    out: Path, federation: str, server_host: str, clients: list[str], params: CkksParams, algorithm: str,
    ca_algorithm: str, days: int, ca_days: int, passphrase: bytes | None, he_dealer: bool,
    envelope_publics: dict[str, bytes],
) -> None:
    ctx = new_secret_context(params)
    for sub in ("ca", "server", "clients", "he"):
        (out / sub).mkdir(parents=True, mode=0o700)

    ca_key = pki.new_private_key(ca_algorithm)
    ca = pki.make_ca(f"fedfms-secure {federation} CA", ca_key, days=ca_days)
    _write_public(out / "ca" / "ca.crt", pki.pem_cert(ca))
    pki.write_private(out / "ca" / "ca.key", pki.pem_private_key(ca_key, passphrase))

    server_key = pki.new_private_key(algorithm)
    server = pki.issue_certificate(ca, ca_key, server_host, server_key, role="server", hosts=[server_host], days=days)
    _write_pair(out / "server", server, server_key, passphrase)
    envelope_keys = {}
    for name in clients:
        envelope_keys[name] = _new_site(out, ca, ca_key, name, algorithm, days, passphrase,
                                        envelope_publics.get(name))

    ckks: dict[str, Any] = {"params": params.to_dict(), "params_fingerprint": params_fingerprint(params)}
    if he_dealer:
        pki.write_private(out / "he" / "site.ctx", serialize_site_context(ctx))
        ckks.update(source="dealer", fingerprint=context_fingerprint(ctx))
    else:
        ckks.update(source="site")
    _write_public(out / "he" / "server.ctx", serialize_params_only(ctx))
    meta = {
        "federation": federation,
        "server_host": server_host,
        "clients": clients,
        "algorithm": algorithm,
        "ca_algorithm": ca_algorithm,
        "days": days,
        "ca_days": ca_days,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "encrypted": bool(passphrase),
        "ckks": ckks,
        "envelope_keys": envelope_keys,
        "site_envelope_keys": sorted(envelope_publics),
        "revocations": [],
        "crl_number": 0,
    }
    _write_federation(out, meta)


def _new_site(
    out: Path, ca: x509.Certificate, ca_key: pki.PrivateKey, name: str, algorithm: str, days: int,
    passphrase: bytes | None, envelope_public: bytes | None = None,
) -> str:
    """Writes ``clients/<name>/`` (TLS pair and envelope key); returns the envelope public key (hex).

    ``envelope_public``: the public key of an envelope key the site made itself; it is certified
    and no ``envelope.key`` is written here.
    """
    folder = out / "clients" / name
    folder.mkdir(mode=0o700)
    envelope = pki.new_envelope_key() if envelope_public is None else None
    public = pki.raw_public(envelope) if envelope is not None else envelope_public
    key = pki.new_private_key(algorithm)
    cert = pki.issue_certificate(ca, ca_key, name, key, role="client", days=days, envelope_key=public)
    _write_pair(folder, cert, key, passphrase)
    if envelope is not None:
        pki.write_private(folder / ENVELOPE_KEY, pki.pem_private_key(envelope, passphrase))
    return public.hex()


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


# --- changes after init --------------------------------------------------------------------------
def add_client(src: Path, name: str, *, passphrase: bytes | None = None, days: int | None = None,
               envelope_public: bytes | None = None) -> Path:
    """Issue a certificate and an envelope key for a new site ``name``; returns its folder.

    ``envelope_public``: the public key of an envelope key the site made itself (then certified,
    and no private envelope key exists here).

    Refuses a name already provisioned (revoked ones included: a revoked name stays out) and a
    site the CKKS packing plan cannot hold. Afterwards re-export the server bundle and restart
    the server; the new site gets the CKKS key at the next ``keys rotate-he`` (or, with a dealer,
    in its bundle).
    """
    src = Path(src)
    meta = read_federation(src)
    validate_name(name, what="client name")
    if name in meta["clients"]:
        revoked = _revoked_sites(meta)
        state = f"was revoked ({revoked[name]['reason']}) and a revoked name stays out" if name in revoked else (
            "is already a site of this federation")
        raise ConfigError(f"site {name!r} {state} ({src / FEDERATION_JSON}): choose another name")
    if envelope_public is not None:
        check_envelope_public(envelope_public, what=f"the envelope key of {name!r}")
        if envelope_public.hex() in meta["envelope_keys"].values():
            raise ConfigError(f"the envelope public key given for {name!r} is already another site's: each site "
                              "makes its own with `fedfms-secure keys envelope-key`")
    params = CkksParams.from_dict(meta["ckks"]["params"])
    active = _active(meta)
    if params.packing is not None and len(active) + 1 > params.packing.sites:
        pk = params.packing
        raise ConfigError(
            f"cannot add {name!r}: the CKKS packing of this federation ({src / FEDERATION_JSON}, ckks.params.packing) "
            f"sums at most {pk.sites} sites x {pk.rounds} rounds and already has {len(active)} active site(s). "
            f"Provision a new federation with room for {len(active) + 1} or more sites (`fedfms-secure keys init "
            "--max-sites N`), or revoke a site that left"
        )
    ca, ca_key = _load_ca(src, passphrase)
    _need_passphrase(src, meta, passphrase)
    public = _new_site(src, ca, ca_key, name, meta["algorithm"], days or int(meta.get("days", DEFAULT_DAYS)), passphrase,
                       envelope_public)
    meta["clients"] = [*meta["clients"], name]
    meta["envelope_keys"] = {**meta["envelope_keys"], name: public}
    if envelope_public is not None:
        meta["site_envelope_keys"] = sorted({*meta.get("site_envelope_keys", []), name})
    meta["encrypted"] = bool(meta.get("encrypted") or passphrase)
    _write_federation(src, meta)
    return src / "clients" / name


def revoke(
    src: Path, name: str, *, reason: str = "key-compromise", passphrase: bytes | None = None
) -> pki.Revocation:
    """Revoke site ``name``'s certificate (CRL at ``ca/crl.pem``) and remove it from the federation.

    From the next call on, a server whose bundle holds the new ``crl.pem`` refuses the site with
    ``reason`` and counts it as retired. Returns the revocation.
    """
    src = Path(src)
    meta = read_federation(src)
    if reason not in pki.REVOCATION_REASONS:
        raise ConfigError(f"unknown revocation reason {reason!r}: use one of {', '.join(pki.REVOCATION_REASONS)}")
    if name not in meta["clients"]:
        raise ConfigError(f"{name!r} is not a site of this federation ({src / FEDERATION_JSON}); known sites: "
                          f"{', '.join(meta['clients'])}")
    revoked = _revoked_sites(meta)
    if name in revoked:
        raise ConfigError(f"site {name!r} was already revoked on {revoked[name]['date']} ({revoked[name]['reason']})")
    cert = pki.load_cert(src / "clients" / name / "tls.crt", remedy=_RESTORE)
    ca, ca_key = _load_ca(src, passphrase)
    entry = pki.Revocation(cert.serial_number, dt.datetime.now(dt.timezone.utc), reason, name, True)
    _publish_revocations(src, meta, ca, ca_key, [entry])
    return entry


def rotate_tls(
    src: Path,
    names: Sequence[str] | None = None,
    *,
    server: bool = False,
    passphrase: bytes | None = None,
    days: int | None = None,
) -> list[str]:
    """New TLS key and certificate (new serial) for the sites ``names`` (None: every active site)
    and, with ``server``, the server; the old certificates are revoked as ``superseded``.

    Envelope keys stay as they are (a rotated site certificate carries the same one). Returns
    the parties rotated ("server" for the server). Re-export their bundles afterwards.
    """
    src = Path(src)
    meta = read_federation(src)
    active = _active(meta)
    revoked = _revoked_sites(meta)
    targets = list(active) if names is None else list(dict.fromkeys(names))
    for name in targets:
        if name in revoked:
            raise ConfigError(f"site {name!r} was revoked on {revoked[name]['date']} ({revoked[name]['reason']}): a "
                              "revoked site gets no new certificate; add it under a new name with `keys add-client`")
        if name not in active:
            raise ConfigError(f"{name!r} is not a site of this federation ({src / FEDERATION_JSON}); known sites: "
                              f"{', '.join(active)}")
    if not targets and not server:
        raise ConfigError("nothing to rotate: name a site, or give --all")
    ca, ca_key = _load_ca(src, passphrase)
    _need_passphrase(src, meta, passphrase)
    meta["encrypted"] = bool(meta.get("encrypted") or passphrase)
    lifetime = days or int(meta.get("days", DEFAULT_DAYS))
    now = dt.datetime.now(dt.timezone.utc)
    entries, done = [], []
    for name in targets:
        folder = src / "clients" / name
        old = pki.load_cert(folder / "tls.crt", remedy=_RESTORE)
        key = pki.new_private_key(meta["algorithm"])
        envelope = bytes.fromhex(meta["envelope_keys"][name])
        cert = pki.issue_certificate(ca, ca_key, name, key, role="client", days=lifetime, envelope_key=envelope)
        _write_pair(folder, cert, key, passphrase)
        entries.append(pki.Revocation(old.serial_number, now, "superseded", name, False))
        done.append(name)
    if server:
        folder = src / "server"
        old = pki.load_cert(folder / "tls.crt", remedy=_RESTORE)
        key = pki.new_private_key(meta["algorithm"])
        cert = pki.issue_certificate(ca, ca_key, meta["server_host"], key, role="server", hosts=[meta["server_host"]],
                                     days=lifetime)
        _write_pair(folder, cert, key, passphrase)
        entries.append(pki.Revocation(old.serial_number, now, "superseded", "server", False))
        done.append("server")
    _publish_revocations(src, meta, ca, ca_key, entries)
    return done


def install_crl(src: Path, bundle: Path, *, role: str | None = "server") -> Path:
    """Copy ``ca/crl.pem`` into a bundle of this federation, of ``role`` unless None (atomically: a
    running server reloads it; a site refuses envelopes signed by a site it removes). Refuses to
    replace a newer list."""
    src, bundle = Path(src), Path(bundle)
    crl_file = src / "ca" / CRL
    if not crl_file.is_file():
        raise KeyMaterialError(f"{crl_file} does not exist: nothing has been revoked yet")
    ca = check_crl_target(src, bundle, role=role)
    data = crl_file.read_bytes()
    _check_crl_not_older(crl_file, data, bundle, ca)
    _write_public(bundle / CRL, data)
    return bundle / CRL


def check_crl_target(src: Path, bundle: Path, *, role: str | None = "server") -> x509.Certificate:
    """The CA certificate of ``bundle`` when it is a bundle (of ``role`` unless None) of the
    federation in ``src``; checked before anything is revoked, so that a wrong ``--server-bundle``
    changes nothing."""
    src, bundle = Path(src), Path(bundle)
    manifest, _ = read_manifest(bundle, "`fedfms-secure keys export server`")
    meta = read_federation(src)
    if manifest["federation"] != meta["federation"] or role not in (None, manifest["role"]):
        want = f"the {role} bundle" if role else "a bundle"
        raise KeyMaterialError(
            f"{bundle} is a {manifest['role']} bundle (of {manifest['name']!r}) of federation "
            f"{manifest['federation']!r}, not {want} of {meta['federation']!r}: give --server-bundle the server's "
            "bundle folder"
        )
    ca = pki.load_cert(bundle / "ca.crt")
    if pki.pem_cert(ca) != pki.pem_cert(pki.load_cert(src / "ca" / "ca.crt", remedy=_RESTORE)):
        raise KeyMaterialError(f"{bundle / 'ca.crt'} is not the CA of {src}: give --server-bundle the server bundle "
                               "exported from this provisioning folder")
    return ca


def _check_crl_not_older(crl_file: Path, data: bytes, out: Path, ca: x509.Certificate) -> None:
    """KeyMaterialError unless the CRL ``data`` (from ``crl_file``) is signed by ``ca`` and is at least
    as new as the one ``out`` holds (replacing a newer one would un-revoke at the next restart)."""
    number = pki.crl_number(pki.crl_from_pem(data, ca, source=str(crl_file)))
    if (out / CRL).is_file():
        try:
            held = pki.crl_number(pki.crl_from_pem((out / CRL).read_bytes(), ca, source=str(out / CRL)))
        except KeyMaterialError:
            held = -1  # unreadable or forged: the CA-signed list replaces it
        if held > number:
            raise KeyMaterialError(
                f"{out / CRL} is revocation list number {held}, newer than {crl_file} (number {number}): the "
                "provisioning folder is older than the bundle (restored from a backup?). Installing it would "
                "un-revoke certificates at the next restart; use the provisioning folder that made list "
                f"number {held}"
            )


def _publish_revocations(
    src: Path, meta: dict[str, Any], ca: x509.Certificate, ca_key: pki.PrivateKey, new: list[pki.Revocation]
) -> None:
    records = [pki.Revocation.from_dict(r, source=str(src / FEDERATION_JSON)) for r in meta["revocations"]]
    records += new
    number = int(meta.get("crl_number", 0)) + 1
    crl = pki.make_crl(ca, ca_key, records, number=number)
    _write_public(src / "ca" / CRL, pki.pem_crl(crl))
    meta["revocations"] = [r.to_dict() for r in records]
    meta["crl_number"] = number
    _write_federation(src, meta)


# --- export --------------------------------------------------------------------------------------
def export_bundle(role: str, name: str | None, src: Path, out: Path, *, update: bool = False) -> Path:
    """Write the bundle of the server (``role="server"``) or of site ``name`` into ``out``.

    ``update``: ``out`` may hold an earlier bundle of the same party and federation; its files are
    replaced (and the files a site added, such as ``he/``, kept).
    """
    src, out = Path(src), Path(out)
    meta = read_federation(src)
    source = meta["ckks"].get("source", "dealer")
    if role == "server":
        party, tls_dir = "server", src / "server"
        ctx_file: Path | None = src / "he" / "server.ctx"
    elif role == "client":
        active = _active(meta)
        if name not in active:
            revoked = _revoked_sites(meta)
            if name in revoked:
                raise KeyMaterialError(f"site {name!r} was revoked on {revoked[name]['date']} "
                                       f"({revoked[name]['reason']}): it gets no bundle")
            raise KeyMaterialError(
                f"unknown client {name!r} in {src / FEDERATION_JSON}; known clients: {', '.join(active)}"
            )
        party, tls_dir = name, src / "clients" / name
        ctx_file = src / "he" / "site.ctx" if source == "dealer" else None
    else:
        raise ConfigError(f"unknown bundle role {role!r}: use 'server' or 'client'")
    sources = {"ca.crt": src / "ca" / "ca.crt", "tls.crt": tls_dir / "tls.crt", "tls.key": tls_dir / "tls.key"}
    site_made = role == "client" and party in meta.get("site_envelope_keys", [])
    if role == "client" and not site_made:
        sources[ENVELOPE_KEY] = tls_dir / ENVELOPE_KEY
    if ctx_file is not None:
        sources["ckks.ctx"] = ctx_file
    for path in sources.values():
        if not path.is_file():
            raise KeyMaterialError(
                f"{path} is missing from the provisioning folder {src}; restore it from a backup, or provision "
                "again with `fedfms-secure keys init`"
            )
    if ctx_file is not None:
        ctx = load_context(ctx_file.read_bytes(), source=str(ctx_file))
        if role == "server" and ctx.has_secret_key():
            raise KeyMaterialError(
                f"{ctx_file} holds the CKKS secret key; the server's context must not: re-run `keys init`"
            )
        if role == "client" and not ctx.has_secret_key():
            raise KeyMaterialError(f"{ctx_file} lacks the CKKS secret key that sites need; re-run `keys init`")
        if params_of(ctx) != CkksParams.from_dict(meta["ckks"]["params"]).ring:
            raise KeyMaterialError(f"{ctx_file} has other CKKS parameters than {src / FEDERATION_JSON}; {_RESTORE}")
    _check_sources(src, role, party, sources, meta)

    crl_file = src / "ca" / CRL
    crl = crl_file.read_bytes() if crl_file.is_file() else None
    if crl is not None:  # checked before anything is written
        _check_crl_not_older(crl_file, crl, out, pki.load_cert(sources["ca.crt"], remedy=_RESTORE))
    _prepare_out(out, role, party, meta["federation"], update)
    secret = {"tls.key", ENVELOPE_KEY} | ({"ckks.ctx"} if role == "client" else set())
    digests = {}
    for filename, path in sources.items():
        data = path.read_bytes()
        if filename in secret:
            pki.write_private(out / filename, data)
        else:
            _write_public(out / filename, data)
        digests[filename] = hashlib.sha256(data).hexdigest()
    if role == "client" and ctx_file is None and (out / "ckks.ctx").exists():
        (out / "ckks.ctx").unlink()  # an updated bundle whose key now comes from a site
    if crl is not None:  # the server refuses revoked peers; a site, envelopes signed by a removed site
        _write_public(out / CRL, crl)
    active = _active(meta)
    ckks = {**meta["ckks"], "source": source, "has_secret_key": role == "client" and source == "dealer"}
    ckks.setdefault("params_fingerprint", params_fingerprint(CkksParams.from_dict(meta["ckks"]["params"])))
    manifest = {
        "role": role,
        "name": party,
        "federation": meta["federation"],
        "server_host": meta["server_host"],
        "clients": active,
        "ckks": ckks,
        "envelope_keys": {site: meta["envelope_keys"][site] for site in active if site in meta["envelope_keys"]},
        "files": digests,
    }
    if site_made:  # the site adds its own envelope.key to the bundle; this host never had it
        manifest["envelope_key_source"] = "site"
    _write_public(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return out


def _check_sources(src: Path, role: str, party: str, sources: dict[str, Path], meta: dict[str, Any]) -> None:
    """The files about to be exported are sound: the certificate is the CA's, valid now, the
    party's, and matches its keys (those not encrypted; an encrypted key is checked by the daemon
    that holds the passphrase, and by ``keys verify --passphrase-file``). KeyMaterialError naming the
    provisioning folder's file otherwise, so that no broken bundle leaves this host."""
    ca = pki.load_cert(sources["ca.crt"], remedy=_RESTORE)
    cert = pki.load_cert(sources["tls.crt"], remedy=_RESTORE)
    pki.verify_issued_by(cert, ca, source=str(sources["tls.crt"]))
    if role == "client":
        if pki.common_name(cert) != party:
            raise KeyMaterialError(f"{sources['tls.crt']} is issued to {pki.common_name(cert)!r}, not to site "
                                   f"{party!r}; {_RESTORE}")
        try:
            listed = bytes.fromhex(str(meta["envelope_keys"].get(party, "")))
        except ValueError:
            raise KeyMaterialError(
                f"{src / FEDERATION_JSON}: the envelope key of {party!r} is not hex; {_RESTORE}"
            ) from None
        if pki.envelope_key_of(cert) not in (None, listed):
            raise KeyMaterialError(f"{sources['tls.crt']} certifies another envelope key than {src / FEDERATION_JSON} "
                                   f"lists for {party!r}; {_RESTORE}")
        raw = sources[ENVELOPE_KEY].read_bytes() if ENVELOPE_KEY in sources else None
        if raw is not None and not pki.is_encrypted_pem(raw):
            envelope = pki.envelope_key_from_pem(raw, source=str(sources[ENVELOPE_KEY]), remedy=_RESTORE)
            if pki.raw_public(envelope) != listed:
                raise KeyMaterialError(f"{sources[ENVELOPE_KEY]} is not the envelope key {src / FEDERATION_JSON} lists "
                                       f"for {party!r}; {_RESTORE}")
    raw = sources["tls.key"].read_bytes()
    if not pki.is_encrypted_pem(raw):
        key = pki.private_key_from_pem(raw, source=str(sources["tls.key"]), remedy=_RESTORE)
        if not pki.key_matches_cert(key, cert):
            raise KeyMaterialError(f"{sources['tls.key']} is not the private key of {sources['tls.crt']}; {_RESTORE}")
    elif b"-----END ENCRYPTED PRIVATE KEY-----" not in raw:
        raise KeyMaterialError(f"{sources['tls.key']} is a damaged encrypted private key; {_RESTORE}")


def _prepare_out(out: Path, role: str, party: str, federation: str, update: bool) -> None:
    if update and out.is_dir() and any(out.iterdir()):
        try:
            old = json.loads((out / MANIFEST).read_text())
            same = (old.get("role"), old.get("name"), old.get("federation")) == (role, party, federation)
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            raise KeyMaterialError(
                f"{out} does not hold a {role} bundle of {party!r} in federation {federation!r} (see its "
                f"{MANIFEST}): --update only rewrites that party's own bundle; give another --out"
            )
        return
    _refuse_non_empty(out, flag="--out")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)


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
    return _revoked_sites(read_federation(src))


def _revoked_sites(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["site"]: r for r in meta["revocations"] if isinstance(r, dict) and r.get("removes_site")}


def _active(meta: dict[str, Any]) -> list[str]:
    revoked = _revoked_sites(meta)
    return [c for c in meta["clients"] if c not in revoked]


def _need_passphrase(src: Path, meta: dict[str, Any], passphrase: bytes | None) -> None:
    """ConfigError when the federation's keys are encrypted but no passphrase was given: a new key
    would otherwise be written in the clear next to encrypted ones (even when ``ca.key`` is not)."""
    if meta.get("encrypted") and not passphrase:
        raise ConfigError(
            f"the private keys of this federation are encrypted with a passphrase ({src / FEDERATION_JSON}: "
            "encrypted): give it with --passphrase-file, so that the new keys are encrypted too"
        )


def _load_ca(src: Path, passphrase: bytes | None) -> tuple[x509.Certificate, pki.PrivateKey]:
    ca = pki.load_cert(src / "ca" / "ca.crt", remedy=_RESTORE)
    key = pki.load_private_key(src / "ca" / "ca.key", passphrase, remedy=_RESTORE)
    if not pki.key_matches_cert(key, ca):
        raise KeyMaterialError(f"{src / 'ca' / 'ca.key'} is not the key of {src / 'ca' / 'ca.crt'}; restore both "
                               "from the same backup")
    return ca, key


def _write_pair(folder: Path, cert: Any, key: pki.PrivateKey, passphrase: bytes | None = None) -> None:
    pki.write_private(folder / "tls.key", pki.pem_private_key(key, passphrase))
    _write_public(folder / "tls.crt", pki.pem_cert(cert))


def _write_public(path: Path, data: bytes) -> None:
    """Write a file others may read (mode 0644), atomically: readers see the old or the new one."""
    write_atomic(path, data, mode=0o644)


def _write_federation(src: Path, meta: dict[str, Any]) -> None:
    _write_public(src / FEDERATION_JSON, (json.dumps(meta, indent=2) + "\n").encode())


def _refuse_non_empty(out: Path, *, flag: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KeyMaterialError(f"{out} already exists and is not empty: use another {flag} or delete it")
