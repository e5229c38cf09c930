"""Cryptography of fedfms-secure: CKKS codec and summer, certificates, key store and bundles.

Modules (one concept each):

* ``ckks``     CkksParams, TenSEAL contexts (site / params-only), load, fingerprint
* ``packing``  the compact scheme (<= 8 B/param): choose_params, quantise, pack lanes, coefficient encoding
* ``payload``  wire format of one ciphertext chunk (v1 one value per slot, v2 packed) and its validation
* ``codec``    site side: ``make_site_codec`` -> PackedCkksCodec / CkksCodec / PlainCodec
* ``summer``   server side: ``make_summer`` -> PackedCkksSummer / CkksSummer / PlainSummer (no key needed)
* ``commands`` ``bench he`` (``register(subparsers)``)
* ``pki``      X.509 CA and leaf certificates for gRPC mutual TLS
* ``keystore`` ``init_federation`` and ``export_bundle`` (provisioning layout documented there)
* ``bundle``   ``Bundle`` and ``load_bundle`` (every check a daemon needs before start)
"""

from __future__ import annotations

from fedfms_secure.crypto.bundle import Bundle, load_bundle
from fedfms_secure.crypto.ckks import (
    CkksParams,
    context_fingerprint,
    load_context,
    new_secret_context,
    params_of,
    serialize_params_only,
    serialize_site_context,
)
from fedfms_secure.crypto.codec import CkksCodec, PackedCkksCodec, PlainCodec, UpdateCodec, make_site_codec
from fedfms_secure.crypto.keystore import export_bundle, init_federation
from fedfms_secure.crypto.packing import PackingConfig, choose_params
from fedfms_secure.crypto.summer import CkksSummer, PackedCkksSummer, PayloadSummer, PlainSummer, make_summer

__all__ = [
    "Bundle",
    "CkksCodec",
    "CkksParams",
    "CkksSummer",
    "PackedCkksCodec",
    "PackedCkksSummer",
    "PackingConfig",
    "PayloadSummer",
    "PlainCodec",
    "PlainSummer",
    "UpdateCodec",
    "choose_params",
    "context_fingerprint",
    "export_bundle",
    "init_federation",
    "load_bundle",
    "load_context",
    "make_site_codec",
    "make_summer",
    "new_secret_context",
    "params_of",
    "serialize_params_only",
    "serialize_site_context",
]
