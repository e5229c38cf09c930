"""Keys and PKI: certificates, provisioning, bundles, envelopes for the CKKS key, revocation.

May import ``fedfms_secure.he`` (to fingerprint and load CKKS contexts), ``fedfms_secure.errors``
and ``fedfms_secure.atomic``; never the server, the site daemon or the transport.

Modules (one concept each):

* ``pki``         X.509 CA and leaf certificates for gRPC mutual TLS
* ``keystore``    ``init_federation`` and ``export_bundle`` (provisioning layout documented there)
* ``bundle``      ``Bundle`` and ``load_bundle`` (every check a daemon needs before start)
* ``keycheck``    ``keys verify`` / ``keys show``: the bundle checks, reported instead of raised
* ``envelope``    the CKKS secret key sealed to each site's X25519 envelope key, signed by its sender
* ``hestore``     a site's CKKS key epochs at rest, encrypted under the bundle passphrase
* ``revocation``  the CA-signed revocation list (CRL), persisted, and its check on every call
"""

from __future__ import annotations

from fedfms_secure.keys.bundle import Bundle, load_bundle
from fedfms_secure.keys.keystore import export_bundle, init_federation

__all__ = ["Bundle", "export_bundle", "init_federation", "load_bundle"]
