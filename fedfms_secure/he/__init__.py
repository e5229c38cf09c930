"""Homomorphic encryption (CKKS via TenSEAL): the maths of encrypted, weighted FedAvg.

Holds no key management: it may import ``fedfms_secure.errors`` and ``fedfms_secure.protocol``,
and never ``fedfms_secure.keys`` (the key side imports this package, not the other way round).

Modules (one concept each):

* ``ckks``       CkksParams, TenSEAL contexts (site / params-only), load, fingerprint
* ``packing``    the compact scheme (<= 8 B/param): choose_params, quantise, pack lanes, coefficient encoding
* ``quantplan``  bound and step from the plan (lr, local steps, sites, DP): UpdatePlan, plan_params, clip_to_bound
* ``payload``    wire format of one ciphertext chunk (v1 one value per slot, v2 packed) and its validation
* ``codec``      site side: ``make_site_codec`` -> PackedCkksCodec / CkksCodec / PlainCodec
* ``aggregate``  server side: ``make_aggregator`` -> PackedCkksAggregator / CkksAggregator / PlainAggregator
                 (adds ciphertexts; needs no key)
* ``rekey``      re-encrypt the global state under a new CKKS key
* ``_native``    the few operations TenSEAL does not expose, through its SEAL bindings
* ``_wire``      the byte layout of serialized SEAL ciphertexts
"""

from __future__ import annotations

from fedfms_secure.he.aggregate import (
    CkksAggregator,
    PackedCkksAggregator,
    PayloadAggregator,
    PlainAggregator,
    make_aggregator,
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
from fedfms_secure.he.codec import CkksCodec, PackedCkksCodec, PlainCodec, UpdateCodec, make_site_codec
from fedfms_secure.he.packing import PackingConfig, choose_params

__all__ = [
    "CkksAggregator",
    "CkksCodec",
    "CkksParams",
    "PackedCkksAggregator",
    "PackedCkksCodec",
    "PackingConfig",
    "PayloadAggregator",
    "PlainAggregator",
    "PlainCodec",
    "UpdateCodec",
    "choose_params",
    "context_fingerprint",
    "load_context",
    "make_aggregator",
    "make_site_codec",
    "new_secret_context",
    "params_of",
    "serialize_params_only",
    "serialize_site_context",
]
