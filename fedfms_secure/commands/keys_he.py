"""``fedfms-secure keys he-init`` and ``keys rotate-he``: the CKKS secret key, made at a site.

``he-init`` (at one site, once): generate the CKKS context with the manifest's parameters, keep it
in the bundle's ``he/`` folder, seal one envelope to every other site and publish them through the
server as key epoch 1. ``rotate-he`` (at a site holding the current key): re-encrypt the global
state under a new context and publish it with fresh envelopes as the next epoch, at a round
boundary. The server only relays the sealed envelopes; it can open none of them. The library
behind both: ``client/hekeys.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(ksub: argparse._SubParsersAction) -> None:
    """Adds ``he-init`` and ``rotate-he`` to the ``keys`` command group."""
    hi = ksub.add_parser(
        "he-init", help="make the federation's CKKS key at this site and seal it to the others (once)",
        description="Run at ONE site, once, after the server has started: generates the CKKS context with the "
                    "parameters of the site's bundle, keeps it in BUNDLE/he/, and publishes one envelope per other "
                    "site (X25519 + HKDF + AES-GCM, signed with this site's TLS key) through the server as key "
                    "epoch 1. The other sites' daemons wait for their envelope, open and verify it.",
    )
    _common(hi)
    hi.set_defaults(handler=_he_init)

    hr = ksub.add_parser(
        "rotate-he", help="replace the CKKS key at the next round boundary; the old key's ciphertexts are refused",
        description="Run at a site that holds the current key, while the federation runs: downloads the global "
                    "state, decrypts it, generates a new CKKS context, encrypts the state under it and publishes it "
                    "with envelopes for the active sites as the next key epoch. The server accepts it only before "
                    "the first commit of a round; the command retries until --wait runs out.",
    )
    _common(hr)
    hr.add_argument("--wait", type=float, default=300.0,
                    help="seconds to wait for a round boundary (default 300)")
    hr.add_argument("--crl", type=Path, metavar="CRL_PEM",
                    help="the federation CA's revocation list (PROVISIONING/ca/crl.pem): no site it revokes gets the "
                         "new key, whatever the server reports; give it after every `keys revoke`")
    hr.set_defaults(handler=_rotate_he)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", type=Path, required=True, metavar="CLIENT_BUNDLE", help="this site's bundle")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--passphrase-file", type=Path,
                   help="file whose first line is the passphrase of the bundle's encrypted private keys; in such a "
                        "bundle it also encrypts the CKKS contexts kept in BUNDLE/he/")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    p.add_argument("--json", action="store_true")


def _connect(args: argparse.Namespace) -> tuple[Any, Any, bytes | None]:
    from fedfms_secure.keys.bundle import load_bundle
    from fedfms_secure.keys.pki import read_passphrase
    from fedfms_secure.transport.client import FederationClient

    passphrase = read_passphrase(args.passphrase_file)
    bundle = load_bundle(args.keys, role="client", passphrase=passphrase)
    client = FederationClient.from_bundle(bundle, args.server, call_timeout=max(args.timeout, 60.0))
    client.wait_ready(args.timeout, flag="--timeout")
    return bundle, client, passphrase


def _report(args: argparse.Namespace, what: str, published: Any) -> None:
    key = published.key
    doc = {"epoch": key.epoch, "fingerprint": key.fingerprint, "round": key.round, "site": key.site,
           "recipients": list(published.recipients), "skipped": list(published.skipped),
           "state_chunks": published.state_chunks, "attempts": published.attempts}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{what}: CKKS key epoch {key.epoch} ({key.fingerprint[:16]}...) made at site {key.site}, in effect from "
          f"round {key.round + 1}")
    print(f"sealed to: {', '.join(published.recipients) or 'no other site'}")
    if published.skipped:
        print(f"no envelope for: {', '.join(published.skipped)} (retired, revoked, or unknown to this bundle; a site "
              "added later gets the key at the next `keys rotate-he`)")


def _he_init(args: argparse.Namespace) -> int:
    from fedfms_secure.site.hekeys import init_key

    bundle, client, passphrase = _connect(args)
    with client:
        published = init_key(client, bundle, passphrase=passphrase)
    _report(args, "he-init", published)
    return 0


def _rotate_he(args: argparse.Namespace) -> int:
    from fedfms_secure.site.hekeys import rotate_key
    from fedfms_secure.keys.bundle import load_envelope_key

    bundle, client, passphrase = _connect(args)
    envelope_key = load_envelope_key(args.keys, passphrase=passphrase)
    crl = _read(args.crl) if args.crl is not None else None
    with client:
        published = rotate_key(client, bundle, envelope_key, wait=args.wait, crl_pem=crl, passphrase=passphrase)
    _report(args, "rotate-he", published)
    return 0


def _read(path: Path) -> bytes:
    from fedfms_secure.errors import KeyMaterialError

    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read the revocation list {path} ({exc.strerror}): give --crl the "
                               "provisioning folder's ca/crl.pem (written by `keys revoke`)") from None
