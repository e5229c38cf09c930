"""CKKS parameters and TenSEAL contexts: create, serialize, load, fingerprint.

Two serialized forms of one federation's context exist:

* the *site* context (``serialize_site_context``): parameters, public key and **secret key**;
  every site holds it, so any site can decrypt the round's aggregate;
* the *params-only* context (``serialize_params_only``, ~100 bytes): parameters and scale, no key
  at all. It is all the server needs to deserialize and add ciphertexts; with it, both
  encryption and decryption raise.

The context fingerprint hashes the parameters *and* the public key, so two contexts with equal
parameters but different keys differ. It can only be computed where the public key is present
(a site context); the server reads it from its bundle manifest.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import tenseal as ts

from fedfms_secure.crypto import _wire
from fedfms_secure.errors import ConfigError, KeyMaterialError

_FINGERPRINT_DOMAIN = b"fedfms-secure/ckks-context/v1\x00"


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters of a federation.

    ``coeff_mod_bit_sizes`` is ``(q0, middle primes..., special prime)``; a fresh ciphertext lives
    at the level without the special prime. Values are encoded as ``round(x * 2**scale_bits)``.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        n = self.poly_modulus_degree
        if not isinstance(n, int) or n < 1024 or n > 32768 or n & (n - 1):
            raise ConfigError(
                f"CKKS poly_modulus_degree={n!r} is invalid: use a power of two between 1024 and 32768 "
                "(8192 is the default)"
            )
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2 or any(b < 20 or b > 60 for b in bits):
            raise ConfigError(
                f"CKKS coeff_mod_bit_sizes={list(bits)} is invalid: give at least two primes of 20..60 bits, "
                "e.g. [60, 40, 60]"
            )
        if not 10 <= self.scale_bits < bits[0]:
            raise ConfigError(
                f"CKKS scale_bits={self.scale_bits} is invalid: it must be at least 10 and below the first "
                f"prime's {bits[0]} bits (e.g. 40 with [60, 40, 60])"
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext (``poly_modulus_degree // 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """The encoding scale ``2**scale_bits``."""
        return float(2**self.scale_bits)

    @property
    def value_bound(self) -> float:
        """Largest magnitude a site may encrypt: ``2**(q0_bits - scale_bits - 1)``.

        Beyond the modulus CKKS wraps *silently*. This bound is conservative: it is the exact
        capacity when the data level holds one prime (e.g. ``(60, 60)``); with more primes the
        real capacity is far larger, which leaves room for sums of many sites' values.
        """
        return float(2 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 1))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``federation.json`` and bundle manifests)."""
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CkksParams:
        """Inverse of ``to_dict``; ConfigError naming the missing or bad field."""
        try:
            return cls(
                poly_modulus_degree=int(d["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
                scale_bits=int(d["scale_bits"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"CKKS parameters {d!r} are incomplete or malformed ({exc!r}); expected keys "
                "poly_modulus_degree, coeff_mod_bit_sizes, scale_bits"
            ) from None


def new_secret_context(params: CkksParams) -> ts.Context:
    """A fresh CKKS context with secret and public key and no relinearization or Galois keys."""
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
    except ValueError as exc:
        raise ConfigError(
            f"TenSEAL rejects CKKS parameters {params.to_dict()}: {exc}. The total of coeff_mod_bit_sizes "
            "must fit the degree (at most 218 bits for 8192, 438 for 16384)"
        ) from None
    ctx.global_scale = params.scale
    # TenSEAL always generates relinearization keys; a reload without them drops them.
    return ts.context_from(serialize_site_context(ctx))


def serialize_site_context(ctx: ts.Context) -> bytes:
    """Parameters, public key and secret key (what a site stores). Keep it secret."""
    if not ctx.has_secret_key():
        raise KeyMaterialError(
            "cannot serialize a site context from a context without the secret key; "
            "load the site's ckks.ctx (or create one with new_secret_context)"
        )
    return ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )


def serialize_params_only(ctx: ts.Context) -> bytes:
    """Parameters and scale only, no key of any kind (what the server stores)."""
    return ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def load_context(data: bytes, *, source: str) -> ts.Context:
    """Deserialize a TenSEAL CKKS context; KeyMaterialError naming ``source`` if it is not one."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise KeyMaterialError(
            f"{source} is empty or not bytes: it should hold a serialized CKKS context; "
            "export the bundle again with `fedfms-secure keys export`"
        )
    try:
        _wire.read_fields(bytes(data))
        ctx = ts.context_from(bytes(data))
        _chain_bits(ctx)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise KeyMaterialError(
            f"{source} is not a valid TenSEAL CKKS context ({exc}); "
            "export the bundle again with `fedfms-secure keys export`"
        ) from None
    if not ctx.global_scale or ctx.global_scale <= 0:
        raise KeyMaterialError(f"{source} is a TenSEAL context without a CKKS scale; it is not a CKKS context")
    return ctx


def context_fingerprint(ctx: ts.Context) -> str:
    """Hex SHA-256 of the encryption parameters, the scale and the public key."""
    if not ctx.has_public_key():
        raise KeyMaterialError(
            "a context fingerprint needs the public key, and this context has none (a params-only "
            "server context?); read the fingerprint from the bundle manifest instead"
        )
    raw = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    fields = {number: value for number, _, value in _wire.read_fields(raw)}
    public = {number: value for number, _, value in _wire.read_fields(fields[2])}
    digest = hashlib.sha256(_FINGERPRINT_DOMAIN)
    for part in (fields[1], public[1], repr(float(ctx.global_scale)).encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def params_of(ctx: ts.Context) -> CkksParams:
    """Recover the CkksParams of a context (with or without keys).

    Prime sizes are read from the bit counts of the modulus chain's products; SEAL picks each
    prime just below ``2**bits``, so the difference between consecutive levels is the prime size.
    """
    bits = _chain_bits(ctx)
    sizes = [bits[-1]] + [bits[i] - bits[i + 1] for i in range(len(bits) - 2, -1, -1)]
    degree = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
    return CkksParams(
        poly_modulus_degree=int(degree),
        coeff_mod_bit_sizes=tuple(sizes),
        scale_bits=int(round(math.log2(ctx.global_scale))),
    )


def _chain_bits(ctx: ts.Context) -> list[int]:
    """Total modulus bit counts from the key level down to the last level."""
    data = ctx.seal_context().data.key_context_data()
    bits = []
    while data is not None:
        bits.append(int(data.total_coeff_modulus_bit_count()))
        data = data.next_context_data()
    return bits
