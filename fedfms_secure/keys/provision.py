"""Provisioning: create a federation's key material (``init_federation``) and add a site (``add_client``).

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
is encrypted with it (PKCS#8, scrypt: see ``pkcs8``); commands that sign (add-client, revoke,
rotate-tls) need it to open ``ca.key``, and the daemons need it to open their bundle's keys.

**Changes after init.** ``add_client`` (here) issues a certificate and an envelope key for a new
site; revocation, TLS rotation and the CRL are in ``lifecycle``; ``export`` writes one bundle
per party (re-export the bundles that changed).
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

from cryptography import x509

from fedfms_secure.errors import ConfigError
from fedfms_secure.he.ckks import (
    CkksParams,
    context_fingerprint,
    new_secret_context,
    serialize_params_only,
    serialize_site_context,
)
from fedfms_secure.keys import pki
from fedfms_secure.keys.bundle import ENVELOPE_KEY, params_fingerprint
from fedfms_secure.keys.federation import (
    DEFAULT_CA_DAYS,
    DEFAULT_DAYS,
    FEDERATION_JSON,
    active_sites,
    check_algorithms,
    check_envelope_public,
    load_ca,
    need_passphrase,
    read_federation,
    refuse_non_empty,
    revoked_in,
    validate_host,
    validate_name,
    write_federation,
    write_pair,
    write_public,
)

__all__ = ["add_client", "init_federation"]


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
    refuse_non_empty(out, flag="--out")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(mode=0o700, exist_ok=True)  # the folder of the CA key: others may not even list it
    for sub in ("ca", "server", "clients", "he"):
        (out / sub).mkdir(mode=0o700)

    ca_key = pki.new_private_key(ca_algorithm)
    ca = pki.make_ca(f"fedfms-secure {federation} CA", ca_key, days=ca_days)
    write_public(out / "ca" / "ca.crt", pki.pem_cert(ca))
    pki.write_private(out / "ca" / "ca.key", pki.pem_private_key(ca_key, passphrase))

    server_key = pki.new_private_key(algorithm)
    server = pki.issue_certificate(ca, ca_key, server_host, server_key, role="server", hosts=[server_host], days=days)
    write_pair(out / "server", server, server_key, passphrase)
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
    write_public(out / "he" / "server.ctx", serialize_params_only(ctx))
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
    write_federation(out, meta)


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
    write_pair(folder, cert, key, passphrase)
    if envelope is not None:
        pki.write_private(folder / ENVELOPE_KEY, pki.pem_private_key(envelope, passphrase))
    return public.hex()


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
        revoked = revoked_in(meta)
        state = f"was revoked ({revoked[name]['reason']}) and a revoked name stays out" if name in revoked else (
            "is already a site of this federation")
        raise ConfigError(f"site {name!r} {state} ({src / FEDERATION_JSON}): choose another name")
    if envelope_public is not None:
        check_envelope_public(envelope_public, what=f"the envelope key of {name!r}")
        if envelope_public.hex() in meta["envelope_keys"].values():
            raise ConfigError(f"the envelope public key given for {name!r} is already another site's: each site "
                              "makes its own with `fedfms-secure keys envelope-key`")
    params = CkksParams.from_dict(meta["ckks"]["params"])
    active = active_sites(meta)
    if params.packing is not None and len(active) + 1 > params.packing.sites:
        pk = params.packing
        raise ConfigError(
            f"cannot add {name!r}: this federation was provisioned with room for {pk.sites} site(s) (`keys init "
            f"--max-sites`, default the number of --clients; {src / FEDERATION_JSON}, ckks.params.packing: its CKKS "
            f"packing sums at most {pk.sites} sites x {pk.rounds} rounds) and already has {len(active)} active "
            f"site(s). Provision a new federation with room for {len(active) + 1} or more sites (`fedfms-secure "
            "keys init ... --max-sites N`), or revoke a site that left"
        )
    ca, ca_key = load_ca(src, passphrase)
    need_passphrase(src, meta, passphrase)
    public = _new_site(src, ca, ca_key, name, meta["algorithm"], days or int(meta.get("days", DEFAULT_DAYS)), passphrase,
                       envelope_public)
    meta["clients"] = [*meta["clients"], name]
    meta["envelope_keys"] = {**meta["envelope_keys"], name: public}
    if envelope_public is not None:
        meta["site_envelope_keys"] = sorted({*meta.get("site_envelope_keys", []), name})
    meta["encrypted"] = bool(meta.get("encrypted") or passphrase)
    write_federation(src, meta)
    return src / "clients" / name
