"""Export one party's bundle from the provisioning folder (``fedfms-secure keys export``).

``export_bundle(role, name, src, out)`` copies what one party needs::

    server: ca.crt  tls.crt  tls.key (0600)  ckks.ctx (params only)  crl.pem (when any)  manifest.json
    client: ca.crt  tls.crt  tls.key (0600)  envelope.key (0600)  ckks.ctx (dealer only, 0600)  crl.pem (when
            any)  manifest.json  peers/<site>.crt (every other active site's certificate)

A site seals the CKKS key only to envelope keys that a certificate in its ``peers/`` certifies
(the manifest is not signed); ``load_bundle`` and ``keys verify`` check each of them.

``update=True`` rewrites a bundle in place, keeping the files a site added to it (``he/``).
``load_bundle`` (in ``bundle``) checks a bundle before a daemon uses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from fedfms_secure.errors import ConfigError, KeyMaterialError
from fedfms_secure.he.ckks import CkksParams, load_context, params_of
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import CRL, ENVELOPE_KEY, MANIFEST, params_fingerprint
from fedfms_secure.keys.rules import PEERS_DIR
from fedfms_secure.keys.federation import (
    FEDERATION_JSON,
    RESTORE,
    active_sites,
    read_federation,
    refuse_non_empty,
    revoked_in,
    write_public,
)
from fedfms_secure.keys.lifecycle import check_crl_not_older

__all__ = ["export_bundle"]


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
        active = active_sites(meta)
        if name not in active:
            revoked = revoked_in(meta)
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
            raise KeyMaterialError(f"{ctx_file} has other CKKS parameters than {src / FEDERATION_JSON}; {RESTORE}")
    _check_sources(src, role, party, sources, meta)
    peers = _peer_certificates(src, party, meta, pki.load_cert(sources["ca.crt"], remedy=RESTORE)) \
        if role == "client" else {}

    crl_file = src / "ca" / CRL
    crl = crl_file.read_bytes() if crl_file.is_file() else None
    if crl is not None:  # checked before anything is written
        check_crl_not_older(crl_file, crl, out, pki.load_cert(sources["ca.crt"], remedy=RESTORE))
    _prepare_out(out, role, party, meta["federation"], update)
    secret = {"tls.key", ENVELOPE_KEY} | ({"ckks.ctx"} if role == "client" else set())
    digests = {}
    for filename, path in sources.items():
        data = path.read_bytes()
        if filename in secret:
            pki.write_private(out / filename, data)
        else:
            write_public(out / filename, data)
        digests[filename] = hashlib.sha256(data).hexdigest()
    if role == "client" and ctx_file is None and (out / "ckks.ctx").exists():
        (out / "ckks.ctx").unlink()  # an updated bundle whose key now comes from a site
    if crl is not None:  # the server refuses revoked peers; a site, envelopes signed by a removed site
        write_public(out / CRL, crl)
    if role == "client":  # the CA's word for each envelope key this site seals to (a revoked site's goes)
        shutil.rmtree(out / PEERS_DIR, ignore_errors=True)
        (out / PEERS_DIR).mkdir(mode=0o700)
        for site, data in peers.items():
            write_public(out / PEERS_DIR / f"{site}.crt", data)
    active = active_sites(meta)
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
    write_public(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return out


def _check_sources(src: Path, role: str, party: str, sources: dict[str, Path], meta: dict[str, Any]) -> None:
    """The files about to be exported are sound: the certificate is the CA's, valid now, the
    party's, and matches its keys (those not encrypted; an encrypted key is checked by the daemon
    that holds the passphrase, and by ``keys verify --passphrase-file``). KeyMaterialError naming the
    provisioning folder's file otherwise, so that no broken bundle leaves this host."""
    ca = pki.load_cert(sources["ca.crt"], remedy=RESTORE)
    cert = pki.load_cert(sources["tls.crt"], remedy=RESTORE)
    pki.verify_issued_by(cert, ca, source=str(sources["tls.crt"]))
    if role == "client":
        if pki.common_name(cert) != party:
            raise KeyMaterialError(f"{sources['tls.crt']} is issued to {pki.common_name(cert)!r}, not to site "
                                   f"{party!r}; {RESTORE}")
        try:
            listed = bytes.fromhex(str(meta["envelope_keys"].get(party, "")))
        except ValueError:
            raise KeyMaterialError(
                f"{src / FEDERATION_JSON}: the envelope key of {party!r} is not hex; {RESTORE}"
            ) from None
        if pki.envelope_key_of(cert) not in (None, listed):
            raise KeyMaterialError(f"{sources['tls.crt']} certifies another envelope key than {src / FEDERATION_JSON} "
                                   f"lists for {party!r}; {RESTORE}")
        raw = sources[ENVELOPE_KEY].read_bytes() if ENVELOPE_KEY in sources else None
        if raw is not None and not pki.is_encrypted_pem(raw):
            envelope = pki.envelope_key_from_pem(raw, source=str(sources[ENVELOPE_KEY]), remedy=RESTORE)
            if pki.raw_public(envelope) != listed:
                raise KeyMaterialError(f"{sources[ENVELOPE_KEY]} is not the envelope key {src / FEDERATION_JSON} lists "
                                       f"for {party!r}; {RESTORE}")
    raw = sources["tls.key"].read_bytes()
    if not pki.is_encrypted_pem(raw):
        key = pki.private_key_from_pem(raw, source=str(sources["tls.key"]), remedy=RESTORE)
        if not pki.key_matches_cert(key, cert):
            raise KeyMaterialError(f"{sources['tls.key']} is not the private key of {sources['tls.crt']}; {RESTORE}")
    elif b"-----END ENCRYPTED PRIVATE KEY-----" not in raw:
        raise KeyMaterialError(f"{sources['tls.key']} is a damaged encrypted private key; {RESTORE}")


def _peer_certificates(src: Path, party: str, meta: dict[str, Any], ca: Any) -> dict[str, bytes]:
    """The certificates of the active sites other than ``party``, each the CA's, issued to its site and
    certifying the envelope key ``federation.json`` lists for it (checked before anything is written)."""
    out = {}
    for site in active_sites(meta):
        if site == party:
            continue
        file = src / "clients" / site / "tls.crt"
        cert = pki.load_cert(file, remedy=RESTORE)
        pki.verify_issued_by(cert, ca, source=str(file))
        certified = pki.envelope_key_of(cert)
        if pki.common_name(cert) != site or certified is None or certified.hex() != meta["envelope_keys"].get(site):
            raise KeyMaterialError(f"{file} does not certify the envelope key {src / FEDERATION_JSON} lists for site "
                                   f"{site!r}; {RESTORE}")
        out[site] = pki.pem_cert(cert)
    return out


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
    refuse_non_empty(out, flag="--out")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
