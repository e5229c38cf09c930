"""Compact CKKS updates: quantise, pack several integers into one coefficient, encrypt, sum, decode.

The scheme (``PackingConfig``, chosen by ``choose_params``; ``PackedCkksCodec`` / ``PackedCkksAggregator``
run it)::

    x (|x| <= bound)  --quantise-->  m = round(x / h),  h = bound / 2**quant_bits,  |m| <= 2**quant_bits
    P integers m_0..m_{P-1} --pack--> M = sum_j m_j * 2**(w*j)           (w = lane_bits, signed lanes)
    M --encode--> coefficient M * 2**t of the plaintext polynomial        (t = scale_bits, the noise margin)
    --encrypt (secret key, seeded)--> one CKKS ciphertext per N coefficients = N*P parameters
    server: ciphertexts add coefficient-wise, so every lane of every coefficient adds
    site: decrypt -> C / 2**t = M_sum + e / 2**t -> round -> balanced base-2**w digits -> m sums -> * h

Why each step, and its bounds (N = poly_modulus_degree, Q = bits of the one data prime q,
S = sites * rounds = the most fresh ciphertexts that one global-state ciphertext ever sums):

1. *Coefficient encoding instead of slot encoding.* CKKS "slots" are the polynomial evaluated at
   roots of unity, so a slot's error sums the noise of all N coefficients: measured at N = 8192 for
   a fresh secret-key ciphertext, std 3.2 (max 15) per coefficient against std 207 (max ~1000) per
   real slot value, and TenSEAL's real-valued vectors use only N/2 real dimensions. So the
   integers go straight into the N coefficients: ``embed`` computes the N/2 complex slot values
   whose encoding has exactly the wanted coefficients, SEAL's CKKSEncoder (complex input, through
   ``tenseal.sealapi``) turns them back into the integer polynomial, and after decryption
   ``unembed`` recovers the coefficients. A ciphertext thus carries N packed values, not N/2, with
   a noise margin of 2**10 instead of ~2**16. Additions are linear in both domains, so the server's
   TenSEAL ``+`` sums the packed integers exactly.
2. *Exact integer sums; errors only from quantisation.* A decrypted coefficient is
   ``2**t * M_sum + e`` with ``|e| <= 21 * S + 2**(Q - 50)``: every fresh secret-key ciphertext
   carries SEAL's centered-binomial noise, which is bounded by 21 (``NOISE_PER_CIPHERTEXT``), and
   the double-precision FFTs of encoding and decoding add at most ``2**(Q - 50)`` (measured about
   2**(Q - 52) at the largest coefficients; ``FFT_SLACK_BITS``). ``t`` is the smallest integer with
   ``2**(t-1) >`` that bound, so rounding ``C / 2**t`` gives ``M_sum`` exactly: no CKKS error is left.
   The decoder also checks every coefficient's distance to the nearest integer against the same
   bound: a ciphertext under another key, or corrupted, decrypts to uniform residues mod q and
   fails that check in practically every coefficient.
3. *Quantisation to the precision the DP noise leaves* (``quantplan.py``). Stochastic rounding
   (default, unbiased: ``E[m h] = x``, ``|m h - x| < h``, error std <= h/2) or round-to-nearest
   (``|m h - x| <= h/2``). Bound and step come from the public plan: Adam's learning rate ``lr``,
   the local steps ``T`` of a round, the K sites. Adam moves a coordinate by ``lr m/sqrt(v)`` a step,
   and ``|m/sqrt(v)|`` is about 1 at most (exactly 1 at the first step; Kingma and Ba's bound is
   (1-b1)/sqrt(1-b2) in the worst, sparse case), so a site's delta lies within ``bound = lr T``
   and a site clips its weighted update ``n_k/N delta_k`` (|n_k/N| <= 1) to it, counting and logging
   the clipped values (post-processing: DP is unaffected). The DP noise: DP-SGD adds
   ``N(0, (sigma C / b)^2)`` to every coordinate of the averaged gradient, while the clipped
   gradients' norm is at most C, i.e. about ``C / sqrt(d)`` per coordinate over d parameters: at
   sigma ~ 1, b = 32 and d >= 5e4 the noise dominates every coordinate but a few. Adam then divides
   by ``sqrt(v) ~ sigma C / b`` itself, so each step moves a coordinate by about lr of unit-variance
   noise, correlated over ~10 steps by the momentum, and the delta's noise std is ``c lr sqrt(T)``
   whatever sigma, C and b are. Simulated Adam (b1 0.9, b2 0.999) on pure noise gives c = 1.00 at
   T = 1, 1.19 at T = 8-12, 1.18 at T = 20, 1.05 at T = 100; a signal as large as the noise lowers
   c to ~0.6, but the norm bound leaves that to a vanishing share of coordinates. The plan uses
   c = 1 (``noise_std = lr sqrt(T_min)`` with the least busy site's T). Measured on the DP demo's
   real deltas (``benchmarks/results/quant_dice.md``): std / (lr sqrt T) 1.16-1.20 and
   max |delta| / (lr T) 0.76-1.00 (T = 15, 20, 25; the bound clipped none). The step must keep
   the quantisation error of the *aggregate* at most ``error_ratio`` (default 1%) of its DP noise:
   sum_k n_k/N delta_k carries noise std ``noise_std sqrt(sum_k w_k^2) >= noise_std / sqrt(K)``
   (equal weights give the least), its quantisation error std is at most ``sqrt(K) h / 2``, so
   ``h <= 2 error_ratio noise_std / K``: the per-coordinate noise std of one site's weighted update
   at equal weights, ``lr sqrt(T) / K``, is what ``--noise-std`` means. ``quant_bits =
   ceil(log2(bound / h))``, i.e. ``ceil(log2(K T_max / (2 error_ratio sqrt(T_min))))`` bits: 10
   for the demo plan (K = 3, T = 15-25; measured error std 0.77% of the aggregate's noise, the
   uniform-rounding average h / sqrt(6) rather than h / 2).
   Without DP the plan states a relative error instead: ``h / 2 <= 1e-3 bound`` (9 bits).
4. *Carry headroom.* A lane is a signed ``w``-bit integer with ``w = quant_bits + 1 +
   bit_length(S)``, so ``S * 2**quant_bits < 2**(w-1)``: the lanes of a sum of S fresh
   ciphertexts (K sites over R rounds into the global state, each |m| <= 2**quant_bits) never
   carry into each other, whatever the weights. Each payload header counts its summands; the
   aggregator refuses a sum past S and the codec refuses to decode one.
5. *Smallest modulus.* ``Q = 1 + t + w * P`` bits: ``|2**t * M_sum + e| < 2**(Q-2) + 2**(t-1)``,
   below q/2 (SEAL's Q-bit primes lie just below 2**Q), so the centred residue is the true sum.
   ``P`` is the largest lane count with ``Q <= 60`` (SEAL's prime limit; one data prime keeps the
   coefficients within the 53 bits of a double after dividing by 2**t). A 60-bit special prime is
   not sent (ciphertexts live below it) and the total stays within SEAL's 128-bit-security limit (218 bits at N = 8192).
6. *Seeded secret-key encryption for uploads.* Every site holds the secret key, so it encrypts
   symmetrically and sends ``(c0, seed)`` instead of ``(c0, c1)``: half the bytes. The server's
   TenSEAL expands the seed on load; its sums and the global state travel as full ciphertexts.

Wire cost per parameter: about ``2 N B_Q / (N P)`` bytes for a full ciphertext, half that for a
seeded upload, where B_Q is SEAL's zstd-compressed size of one Q-bit residue: measured 7.3-7.6 B for
any Q from 50 to 56 (its byte-wise entropy coder gains little from the zero top bits; about
Q/8 + 0.9 at Q = 53). K = 3 sites, R = 5 rounds (t = 10, w = quant_bits + 5), measured at vit_b
FedMSA's 11.16M values or a 1e6 slice (``benchmarks/results/he_bench.md``): 10 bits (the demo
plan) give 3 lanes of 15 bits in Q = 56, 2.53 B/param up and 5.06 for sums and the global state
(7.59 a round, against 8 for plaintext fp32); 9 bits (Q = 53) 2.52 + 5.03; 8 bits (Q = 50) 2.42 +
4.84; the former fixed 16 bits, 2 lanes: 3.82 + 7.61. At most 2.5 B/param up therefore needs 8 bits
or fewer at K x R = 15, which the 1% rule allows only when ``K T_max / sqrt(T_min)`` <= 5.1;
below that, only a tighter serialization than SEAL's zstd (e.g. c0 bit-packed to Q bits: 7 B per
coefficient at Q = 56, 2.33 B/param) would help. ``choose_params`` / ``plan_params`` raise a
ConfigError naming the limit when the lanes that the headroom needs do not fit one 60-bit prime or
the byte limit.

The sample count (``encrypt_scalar``) travels in coefficient 0 as ``round(x * 2**8) * 2**t`` with all
other coefficients zero; sums of up to ``sites`` of them are exact to 2**-8.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedfms_secure.errors import ConfigError, CryptoError

#: SEAL's largest total coefficient-modulus bits at 128-bit classical security (HomomorphicEncryption.org)
SEAL_MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: |noise| of one fresh secret-key ciphertext per coefficient (SEAL's centered binomial, 21 coin pairs)
NOISE_PER_CIPHERTEXT = 21
#: double-precision error of encode + decode: at most 2**(Q - FFT_SLACK_BITS) per coefficient
FFT_SLACK_BITS = 50
#: fixed-point fraction bits of an encrypted scalar (the sample count)
SCALAR_FRAC_BITS = 8
#: largest prime SEAL generates, hence the largest data prime Q
MAX_PRIME_BITS = 60
#: the special (key-level) prime: never on the wire
SPECIAL_PRIME_BITS = 60
#: serialized bytes per Q-bit residue beyond Q/8 (SEAL's zstd framing), measured at N = 8192
ZSTD_OVERHEAD_BYTES = 0.9
ROUNDINGS = ("stochastic", "nearest")
#: smallest scale_bits (CkksParams refuses less for the unpacked scheme; one rule for both)
MIN_SCALE_BITS = 10
#: default bound on every value of a weighted update n_k/N * delta_k that the packing must carry
#: (Adam moves a parameter by about lr a step, so 1.0 leaves room at any sane learning rate);
#: larger values are clipped to +-bound before they are encrypted
DEFAULT_UPDATE_BOUND = 1.0


@dataclass(frozen=True)
class PackingConfig:
    """How updates are quantised and packed; stored in the manifest's ``ckks.params.packing``.

    ``bound``: the largest |value| a site may encrypt (e.g. the clipping norm scaled to the update);
    ``sites``/``rounds``: the federation's K and R, which bound the summands of one ciphertext;
    ``quant_bits``: the step is ``bound / 2**quant_bits``; ``lanes``/``lane_bits``: integers per
    coefficient and their signed width; ``rounding``: "stochastic" or "nearest".
    """

    bound: float
    sites: int
    rounds: int
    quant_bits: int = 16
    lanes: int = 2
    lane_bits: int = 21
    rounding: str = "stochastic"
    noise_std: float | None = None

    def __post_init__(self) -> None:
        noise = self.noise_std
        if noise is not None:
            if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise <= 0:
                raise ConfigError(f"packing noise_std={noise!r} must be a positive finite number or absent")
            object.__setattr__(self, "noise_std", float(noise))
        bound = self.bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise ConfigError(f"packing bound={bound!r} must be a positive finite number (the largest |update value|)")
        object.__setattr__(self, "bound", float(bound))
        for name, low, high in (("sites", 1, 1 << 20), ("rounds", 1, 1 << 20), ("quant_bits", 1, 40),
                                ("lanes", 1, 32), ("lane_bits", 3, 58)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"packing {name}={value!r} must be an integer in {low}..{high}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"packing rounding={self.rounding!r} is unknown: use one of {', '.join(ROUNDINGS)}")
        if self.lane_bits < self.min_lane_bits:
            raise ConfigError(
                f"packing lane_bits={self.lane_bits} cannot hold {self.summands} summands of {self.quant_bits}-bit "
                f"values: it needs quant_bits + 1 + bit_length(sites * rounds) = {self.min_lane_bits}; "
                "use choose_params(bound=, sites=, rounds=) to derive a consistent configuration"
            )

    @property
    def summands(self) -> int:
        """Most fresh ciphertexts one ciphertext may sum: every site in every round (``sites * rounds``)."""
        return self.sites * self.rounds

    @property
    def min_lane_bits(self) -> int:
        """Sign + quantised magnitude + carry bits for ``summands``."""
        return self.quant_bits + 1 + self.summands.bit_length()

    @property
    def step(self) -> float:
        """The quantisation step ``h = bound / 2**quant_bits``."""
        return self.bound / 2.0**self.quant_bits

    @property
    def max_level(self) -> int:
        """Largest |quantised integer| one value may become."""
        return 1 << self.quant_bits

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["noise_std"] is None:  # absent, as in manifests written before it was recorded
            del d["noise_std"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> PackingConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"packing {d!r} is not an object")
        try:
            return cls(
                bound=d["bound"], sites=d["sites"], rounds=d["rounds"], quant_bits=d["quant_bits"],
                lanes=d["lanes"], lane_bits=d["lane_bits"], rounding=d["rounding"], noise_std=d.get("noise_std"),
            )
        except KeyError as exc:
            raise ConfigError(
                f"packing {d!r} lacks {exc}; expected bound, sites, rounds, quant_bits, lanes, lane_bits, rounding"
            ) from None

    def check_plan(self, *, sites: int, rounds: int) -> None:
        """ConfigError unless a federation of ``sites`` over ``rounds`` rounds fits the carry headroom."""
        if sites * rounds > self.summands:
            raise ConfigError(
                f"{sites} sites x {rounds} rounds would sum {sites * rounds} ciphertexts into the global state, but "
                f"the CKKS packing has headroom for {self.summands} ({self.sites} sites x {self.rounds} rounds): "
                "provision the federation again with `keys init` for at least these sites and rounds, or plan fewer"
            )

    def check_ring(self, poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...], scale_bits: int) -> None:
        """ConfigError unless the ring parameters decode every sum this packing allows exactly."""
        where = f"CKKS params (N={poly_modulus_degree}, coeff_mod_bit_sizes={list(coeff_mod_bit_sizes)}, " \
                f"scale_bits={scale_bits}) with packing {self.to_dict()}"
        remedy = "derive them with choose_params(bound=, sites=, rounds=)"
        if len(coeff_mod_bit_sizes) != 2:
            raise ConfigError(f"{where}: packed updates use one data prime and one special prime; {remedy}")
        q_bits = coeff_mod_bit_sizes[0]
        need_t = required_scale_bits(self.summands, q_bits)
        if scale_bits < need_t:
            raise ConfigError(
                f"{where}: scale_bits must be at least {need_t} so that the noise of {self.summands} summed "
                f"ciphertexts (<= {noise_bound(self.summands, q_bits):.0f}) stays below half a unit; {remedy}"
            )
        if 1 + scale_bits + self.lane_bits * self.lanes > q_bits:
            raise ConfigError(
                f"{where}: {self.lanes} lanes of {self.lane_bits} bits at scale 2^{scale_bits} need a data prime of "
                f"{1 + scale_bits + self.lane_bits * self.lanes} bits, not {q_bits}; {remedy}"
            )
        limit = SEAL_MAX_BITS_128.get(poly_modulus_degree)
        if limit is None or sum(coeff_mod_bit_sizes) > limit:
            raise ConfigError(
                f"{where}: {sum(coeff_mod_bit_sizes)} modulus bits exceed the 128-bit-security limit of "
                f"{limit} for N={poly_modulus_degree}; {remedy}"
            )


def noise_bound(summands: int, q_bits: int) -> float:
    """Largest |error| of a decrypted coefficient of a sum of ``summands`` fresh ciphertexts."""
    return float(NOISE_PER_CIPHERTEXT * max(summands, 1) + 2.0 ** (q_bits - FFT_SLACK_BITS))


def required_scale_bits(summands: int, q_bits: int) -> int:
    """Smallest t with ``2**(t-1) > noise_bound``: rounding ``C / 2**t`` is then exact.

    At least ``MIN_SCALE_BITS``, the smallest scale a CKKS context of this package accepts.
    """
    return max(MIN_SCALE_BITS, math.floor(math.log2(noise_bound(summands, q_bits))) + 2)


def estimate_bytes_per_param(poly_modulus_degree: int, q_bits: int, lanes: int, *, seeded: bool = False) -> float:
    """Serialized bytes per parameter of a full chunk (about; ``seeded``: an upload).

    An upper estimate from Q = 53 up: SEAL's zstd measured 7.55-7.6 B per residue for Q from 53 to 56."""
    polys = 1 if seeded else 2
    return polys * poly_modulus_degree * (q_bits / 8 + ZSTD_OVERHEAD_BYTES) / (poly_modulus_degree * lanes)


def choose_params(
    *,
    bound: float,
    sites: int,
    rounds: int,
    quant_bits: int = 16,
    rounding: str = "stochastic",
    poly_modulus_degree: int = 8192,
    max_bytes_per_param: float | None = 8.0,
) -> Any:
    """CkksParams (with packing) for updates bounded by ``bound``, ``sites`` sites and ``rounds`` rounds.

    Picks the most lanes per coefficient whose data prime fits 60 bits, the smallest prime and scale
    the noise of ``sites * rounds`` summands allows, and a 60-bit special prime (within 128-bit
    security). ConfigError if the result costs more than ``max_bytes_per_param`` (None: no limit).
    """
    from fedfms_secure.he.ckks import CkksParams  # ckks imports this module

    probe = PackingConfig(bound=bound, sites=sites, rounds=rounds, quant_bits=quant_bits, lanes=1,
                          lane_bits=max(3, quant_bits + 1 + (sites * rounds).bit_length()), rounding=rounding)
    w, s = probe.lane_bits, probe.summands
    limit = SEAL_MAX_BITS_128.get(poly_modulus_degree)
    if limit is None:
        raise ConfigError(f"poly_modulus_degree={poly_modulus_degree} is not a power of two in 1024..32768")
    best = None
    for lanes in range(MAX_PRIME_BITS // w, 0, -1):
        t = required_scale_bits(s, MAX_PRIME_BITS)
        for _ in range(4):  # t depends on Q only through the FFT slack: converges at once
            q_bits = max(20, 1 + t + w * lanes)
            t = required_scale_bits(s, q_bits)
        q_bits = max(20, 1 + t + w * lanes)
        special = min(SPECIAL_PRIME_BITS, limit - q_bits)
        if q_bits <= MAX_PRIME_BITS and special >= 20:
            best = (lanes, q_bits, t, special)
            break
    if best is None:
        raise ConfigError(
            f"{quant_bits}-bit values with headroom for {s} summands ({sites} sites x {rounds} rounds) need "
            f"{w}-bit lanes, which do not fit one {MAX_PRIME_BITS}-bit prime at N={poly_modulus_degree}: "
            "lower quant_bits or the number of rounds"
        )
    lanes, q_bits, t, special = best
    cost = estimate_bytes_per_param(poly_modulus_degree, q_bits, lanes)
    if max_bytes_per_param is not None and cost > max_bytes_per_param:
        fits = None
        for fewer in range(quant_bits - 1, 0, -1):
            try:
                choose_params(bound=bound, sites=sites, rounds=rounds, quant_bits=fewer, rounding=rounding,
                              poly_modulus_degree=poly_modulus_degree, max_bytes_per_param=max_bytes_per_param)
            except ConfigError:
                continue
            fits = fewer
            break
        hint = f"quant_bits <= {fits} fits with these sites and rounds" if fits else "plan fewer sites or rounds"
        raise ConfigError(
            f"{quant_bits}-bit values with headroom for {s} summands ({sites} sites x {rounds} rounds) need "
            f"{w}-bit lanes: {lanes} per coefficient cost about {cost:.2f} B per parameter, over the "
            f"{max_bytes_per_param:g} B limit; {hint} (or allow more bytes per parameter)"
        )
    packing = PackingConfig(bound=bound, sites=sites, rounds=rounds, quant_bits=quant_bits, lanes=lanes,
                            lane_bits=w, rounding=rounding)
    return CkksParams(poly_modulus_degree=poly_modulus_degree, coeff_mod_bit_sizes=(q_bits, special),
                      scale_bits=t, packing=packing)


def layout_tag(ring: dict[str, Any], packing: PackingConfig) -> bytes:
    """8 bytes naming the ring parameters and the packing; every packed payload carries it."""
    text = json.dumps({"ring": ring, "packing": packing.to_dict()}, sort_keys=True).encode()
    return hashlib.sha256(b"fedfms-secure/ckks-packing/v1\x00" + text).digest()[:8]


# --- quantise and pack -----------------------------------------------------------------------------
def quantize(values: np.ndarray, cfg: PackingConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """int64 levels of ``values`` (|values| <= bound already checked): ``round(values / step)``."""
    scaled = np.asarray(values, dtype=np.float64) * (2.0**cfg.quant_bits / cfg.bound)
    if cfg.rounding == "nearest":
        levels = np.rint(scaled)
    else:
        rng = rng if rng is not None else np.random.default_rng()
        levels = np.floor(scaled + rng.random(scaled.shape))
    return np.clip(levels, -cfg.max_level, cfg.max_level).astype(np.int64)


def pack_lanes(levels: np.ndarray, cfg: PackingConfig, n_coeffs: int) -> np.ndarray:
    """``M[k] = sum_j levels[j * n + k] * 2**(w j)`` (lane-major; missing values are 0), int64."""
    if levels.size > n_coeffs * cfg.lanes:
        raise CryptoError(f"{levels.size} values do not fit one chunk of {n_coeffs * cfg.lanes}")
    padded = np.zeros(n_coeffs * cfg.lanes, dtype=np.int64)
    padded[: levels.size] = levels
    packed = np.zeros(n_coeffs, dtype=np.int64)
    for j in range(cfg.lanes - 1, -1, -1):  # Horner: exact in int64 since w * lanes <= 58
        packed = (packed << cfg.lane_bits) + padded[j * n_coeffs : (j + 1) * n_coeffs]
    return packed


def unpack_lanes(packed: np.ndarray, cfg: PackingConfig, count: int, summands: int) -> np.ndarray:
    """Lane sums (int64, ``count`` of them) from the rounded coefficients; CryptoError if any is impossible."""
    n = packed.size
    w, half = cfg.lane_bits, 1 << (cfg.lane_bits - 1)
    rest = packed.astype(np.int64)
    lanes = np.empty((cfg.lanes, n), dtype=np.int64)
    for j in range(cfg.lanes):
        digit = ((rest + half) & ((1 << w) - 1)) - half  # balanced digit in [-2**(w-1), 2**(w-1))
        lanes[j] = digit
        rest = (rest - digit) >> w
    flat = lanes.reshape(-1)
    limit = summands * cfg.max_level
    if np.any(rest != 0) or np.any(np.abs(flat) > limit) or np.any(flat[count:] != 0):
        raise CryptoError(
            f"decrypted lanes are out of range for a sum of {summands} ciphertexts (|lane| <= {limit}, unused "
            "lanes 0): the ciphertext is corrupt, was made under another key, or its sum overflowed"
        )
    return flat[:count]


# --- coefficients <-> CKKS slots ---------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _embedding(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Twist ``zeta**k`` and its inverse, and the DFT indices of slot j and of its conjugate.

    SEAL's slot j holds the polynomial evaluated at ``zeta**(3**j mod 2n)``, zeta = exp(i pi / n).
    Evaluating at every odd power ``2l + 1`` is a DFT of ``m_k zeta**k``; the slots pick ``l = (3**j - 1)/2``
    and the conjugate slots ``l = (2n - 3**j - 1)/2``.
    """
    k = np.arange(n)
    twist = np.exp(1j * np.pi * k / n)
    gens = np.empty(n // 2, dtype=np.int64)
    g = 1
    for j in range(n // 2):
        gens[j] = g
        g = g * 3 % (2 * n)
    return twist, np.conj(twist), (gens - 1) // 2, (2 * n - gens - 1) // 2


def embed(coeffs: np.ndarray) -> np.ndarray:
    """The N/2 complex slot values whose CKKS encoding (scale 1) has these N real coefficients."""
    n = coeffs.size
    twist, _, idx, _ = _embedding(n)
    return (n * np.fft.ifft(coeffs.astype(np.float64) * twist))[idx]


def unembed(slots: np.ndarray) -> np.ndarray:
    """Inverse of ``embed``: the N real coefficients behind N/2 complex slot values."""
    n = 2 * slots.size
    _, untwist, idx, conj_idx = _embedding(n)
    full = np.zeros(n, dtype=np.complex128)
    full[idx] = slots
    full[conj_idx] = np.conj(slots)
    return np.real(np.fft.fft(full) / n * untwist)


def fit_params(*, bound: float, sites: int, rounds: int, quant_bits: int | None = None,
               rounding: str = "stochastic", max_bytes_per_param: float = 8.0) -> Any:
    """``choose_params`` with the finest quantisation (20 bits down to 8) that fits the byte limit,
    or exactly ``quant_bits`` when given."""
    if quant_bits is not None:
        return choose_params(bound=bound, sites=sites, rounds=rounds, quant_bits=quant_bits, rounding=rounding,
                             max_bytes_per_param=max_bytes_per_param)
    error: ConfigError | None = None
    for bits in range(20, 7, -1):
        try:
            return choose_params(bound=bound, sites=sites, rounds=rounds, quant_bits=bits, rounding=rounding,
                                 max_bytes_per_param=max_bytes_per_param)
        except ConfigError as exc:
            error = error or exc
    raise ConfigError(f"no quantisation of 8 bits or more fits {sites} sites x {rounds} rounds in "
                      f"{max_bytes_per_param:g} B per parameter ({error}); plan fewer rounds per key, "
                      "or provision with --legacy-ckks")
