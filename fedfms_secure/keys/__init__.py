"""Keys and PKI: certificates, provisioning, bundles, envelopes for the CKKS key, revocation.

May import ``fedfms_secure.he`` (to fingerprint and load CKKS contexts), ``fedfms_secure.errors``
and ``fedfms_secure.atomic``; never the server, the site daemon or the transport.

Modules (one concept each):

* ``pki``         X.509 CA and leaf certificates for gRPC mutual TLS
* ``pkcs8``       private key files at rest: PKCS#8 encrypted with scrypt under the bundle passphrase
* ``federation``  the provisioning folder: ``federation.json``, party names, how its files are written
* ``provision``   ``init_federation`` and ``add_client`` (provisioning layout documented there)
* ``lifecycle``   ``revoke``, ``rotate_tls`` and the CA-signed revocation list they publish
* ``export``      ``export_bundle``: one party's bundle, written or updated in place
* ``bundle``      ``Bundle`` and ``load_bundle`` (every check a daemon needs before start)
* ``rules``       each rule of a bundle, one function: raised by ``load_bundle``, reported by ``keys verify``
* ``keycheck``    ``keys verify`` / ``keys show``: the bundle rules, reported instead of raised
* ``envelope``    the CKKS secret key sealed to each site's X25519 envelope key, signed by its sender
* ``hestore``     a site's CKKS key epochs at rest, encrypted under the bundle passphrase
* ``revocation``  the CA-signed revocation list (CRL), persisted, and its check on every call
"""

from __future__ import annotations

from fedfms_secure.keys.bundle import Bundle, load_bundle
from fedfms_secure.keys.export import export_bundle
from fedfms_secure.keys.provision import init_federation

__all__ = ["Bundle", "export_bundle", "init_federation", "load_bundle"]
