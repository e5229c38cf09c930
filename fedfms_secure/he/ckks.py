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
from dataclasses import dataclass, replace
from typing import Any

import tenseal as ts

from fedfms_secure.he import _wire
from fedfms_secure.he.packing import PackingConfig
from fedfms_secure.errors import ConfigError, KeyMaterialError

_FINGERPRINT_DOMAIN = b"fedfms-secure/ckks-context/v1\x00"
# How many values at the bound one ciphertext may accumulate (the sites of a round plus theta)
# before its sum could pass the capacity. Cross-silo federations are far smaller.
MAX_SUMMANDS = 64


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters of a federation.

    ``coeff_mod_bit_sizes`` is ``(q0, middle primes..., special prime)``; a fresh ciphertext lives
    at the level without the special prime. Values are encoded as ``round(x * 2**scale_bits)``.

    ``packing`` (None: one value per slot, the defaults above) selects the compact scheme of
    ``packing.py``: quantised integers packed into the polynomial's coefficients, ``scale_bits``
    then being the noise margin. ``choose_params`` derives all fields from the update's bound, the
    number of sites and the rounds. The context itself only knows the ring (``ring``); the packing
    travels in the manifest next to it.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40
    packing: PackingConfig | None = None

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
        if self.value_bound < 1.0:
            raise ConfigError(
                f"CKKS coeff_mod_bit_sizes={list(bits)} with scale_bits={self.scale_bits} leave no headroom: "
                f"a ciphertext holds values up to 2^{self.data_bits - self.scale_bits - 2} "
                f"(2^(data bits {self.data_bits} - scale_bits - 2)), too little to sum {MAX_SUMMANDS} values of "
                "magnitude 1. Lower scale_bits or add a middle prime (e.g. [60, 40, 60] with scale_bits 40)"
            )
        if self.packing is not None:
            if not isinstance(self.packing, PackingConfig):
                raise ConfigError(f"CKKS packing must be a PackingConfig, got {type(self.packing).__name__}")
            self.packing.check_ring(n, bits, self.scale_bits)

    @property
    def slots(self) -> int:
        """Values per ciphertext (``poly_modulus_degree // 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """The encoding scale ``2**scale_bits``."""
        return float(2**self.scale_bits)

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives under (every prime but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def capacity(self) -> float:
        """Largest magnitude one ciphertext slot may hold: ``2**(data_bits - scale_bits - 2)``.

        SEAL refuses to encode a value whose scaled coefficient needs ``data_bits - 1`` bits or
        more, which for a value replicated over the slots is ``|x| * scale >= 2**(data_bits - 2)``.
        A *sum* of ciphertexts is not checked by anyone: it wraps silently once it passes about
        ``2**(data_bits - scale_bits - 1)`` (twice this capacity). E.g. ``(60, 60)`` at ``2**40``:
        the data level is the single 60-bit prime, so the capacity is ``2**18`` = 262144 and a sum
        wraps past about 5.2e5; ``(60, 40, 60)`` has 100 data bits and a capacity of ``2**58``.
        """
        return float(2.0 ** (self.data_bits - self.scale_bits - 2))

    @property
    def value_bound(self) -> float:
        """Largest magnitude a site may encrypt (or the server add as plaintext): ``capacity / MAX_SUMMANDS``.

        A sum of up to ``MAX_SUMMANDS`` values within this bound stays within ``capacity``, so it
        neither wraps nor loses its sign. The codec and the aggregator refuse anything larger.
        """
        return self.capacity / MAX_SUMMANDS

    @property
    def ring(self) -> CkksParams:
        """These parameters without the packing: what a TenSEAL context holds (``params_of``)."""
        return replace(self, packing=None) if self.packing is not None else self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``federation.json`` and bundle manifests); ``packing`` only when set."""
        d: dict[str, Any] = {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
        }
        if self.packing is not None:
            d["packing"] = self.packing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CkksParams:
        """Inverse of ``to_dict``; ConfigError naming the missing or bad field."""
        try:
            return cls(
                poly_modulus_degree=int(d["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
                scale_bits=int(d["scale_bits"]),
                packing=PackingConfig.from_dict(d["packing"]) if d.get("packing") is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
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
        scheme = ctx.seal_context().data.key_context_data().parms().scheme()
        if getattr(scheme, "name", None) != "CKKS":
            raise ValueError(f"its scheme is {getattr(scheme, 'name', scheme)}, not CKKS")
        if not ctx.global_scale > 0:  # a context without a scale raises ValueError here
            raise ValueError("it has no positive CKKS scale")
    except (ValueError, RuntimeError, TypeError) as exc:
        raise KeyMaterialError(
            f"{source} is not a valid TenSEAL CKKS context ({exc}); "
            "export the bundle again with `fedfms-secure keys export`"
        ) from None
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


def is_fingerprint(text: object) -> bool:
    """Whether ``text`` has the form of ``context_fingerprint``'s result (64 lowercase hex digits)."""
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


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
