"""Certificate lifecycle after provisioning: revoke a site, rotate TLS certificates, publish the CRL.

``revoke`` puts a site's certificate on the CA-signed CRL (``ca/crl.pem``) and removes the site
from the federation; ``rotate_tls`` replaces certificates and revokes the old ones as
``superseded``; ``install_crl`` copies the CRL into a server bundle (a running server reloads
it) or a site's (it then refuses envelopes signed by a removed site), never over a newer list.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from fedfms_secure.errors import ConfigError, KeyMaterialError
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import CRL, read_manifest
from fedfms_secure.keys.federation import (
    DEFAULT_DAYS,
    FEDERATION_JSON,
    RESTORE,
    active_sites,
    load_ca,
    need_passphrase,
    read_federation,
    revoked_in,
    write_federation,
    write_pair,
    write_public,
)

__all__ = ["check_crl_not_older", "check_crl_target", "install_crl", "revoke", "rotate_tls"]


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
    revoked = revoked_in(meta)
    if name in revoked:
        raise ConfigError(f"site {name!r} was already revoked on {revoked[name]['date']} ({revoked[name]['reason']})")
    cert = pki.load_cert(src / "clients" / name / "tls.crt", remedy=RESTORE)
    ca, ca_key = load_ca(src, passphrase)
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
    active = active_sites(meta)
    revoked = revoked_in(meta)
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
    ca, ca_key = load_ca(src, passphrase)
    need_passphrase(src, meta, passphrase)
    meta["encrypted"] = bool(meta.get("encrypted") or passphrase)
    lifetime = days or int(meta.get("days", DEFAULT_DAYS))
    now = dt.datetime.now(dt.timezone.utc)
    entries, done = [], []
    for name in targets:
        folder = src / "clients" / name
        old = pki.load_cert(folder / "tls.crt", remedy=RESTORE)
        key = pki.new_private_key(meta["algorithm"])
        envelope = bytes.fromhex(meta["envelope_keys"][name])
        cert = pki.issue_certificate(ca, ca_key, name, key, role="client", days=lifetime, envelope_key=envelope)
        write_pair(folder, cert, key, passphrase)
        entries.append(pki.Revocation(old.serial_number, now, "superseded", name, False))
        done.append(name)
    if server:
        folder = src / "server"
        old = pki.load_cert(folder / "tls.crt", remedy=RESTORE)
        key = pki.new_private_key(meta["algorithm"])
        cert = pki.issue_certificate(ca, ca_key, meta["server_host"], key, role="server", hosts=[meta["server_host"]],
                                     days=lifetime)
        write_pair(folder, cert, key, passphrase)
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
    check_crl_not_older(crl_file, data, bundle, ca)
    write_public(bundle / CRL, data)
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
    if pki.pem_cert(ca) != pki.pem_cert(pki.load_cert(src / "ca" / "ca.crt", remedy=RESTORE)):
        raise KeyMaterialError(f"{bundle / 'ca.crt'} is not the CA of {src}: give --server-bundle the server bundle "
                               "exported from this provisioning folder")
    return ca


def check_crl_not_older(crl_file: Path, data: bytes, out: Path, ca: x509.Certificate) -> None:
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
    write_public(src / "ca" / CRL, pki.pem_crl(crl))
    meta["revocations"] = [r.to_dict() for r in records]
    meta["crl_number"] = number
    write_federation(src, meta)
