"""``fedfms-secure bench he``: what the packed CKKS scheme costs, measured on this machine.

``register(subparsers)`` adds the ``bench`` command group (the CLI wires it); heavy imports wait
for the handler. ``bench he --params N --json`` prints one JSON line::

    {"params", "bytes_per_param", "encrypt_s", "decrypt_s", "sum_s_per_site", "max_abs_error", ...}

for N random values uniform within the configured bound at each of K sites: ``bytes_per_param``
is one site's upload (seeded ciphertexts), ``encrypt_s`` one site's time to encrypt its N values
(mean over sites), ``sum_s_per_site`` the server's time to parse and add one site's N values,
``decrypt_s`` the time to decrypt the sum, ``max_abs_error`` the largest |decrypted sum - exact sum|.
Also reported: ``bytes_per_param_sum`` (the summed ciphertexts, i.e. what the global state costs
to download), the error's std, its documented bound and the parameters chosen. With the plan's
figures (``--noise-std``, or ``--lr`` and ``--local-steps``; ``he/quantplan.py``) the step is sized
to the DP noise and ``error_to_noise`` is the sum's error std over the DP noise std of the K
weighted updates it sums (``sqrt(K) x noise_std``): the plan keeps it at most ``--max-error-ratio``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``bench`` (with ``he``) to an argparse subparsers object."""
    bench = subparsers.add_parser("bench", help="measure costs on this machine")
    bsub = bench.add_subparsers(metavar="WHAT")
    he = bsub.add_parser("he", help="packed CKKS: bytes per parameter, seconds, error of a K-site sum")
    he.add_argument("--params", type=_count, required=True, help="values per site (e.g. 1e6 or 11160000)")
    he.add_argument("--sites", type=int, default=3, help="K: sites summed (default 3)")
    he.add_argument("--rounds", type=int, default=5, help="R: rounds the parameters must allow (default 5)")
    he.add_argument("--bound", type=float, help="largest |value| of a weighted update (default: --lr x "
                                                "--local-steps with a plan, else 1.0)")
    he.add_argument("--noise-std", type=float,
                    help="per-coordinate DP noise std of one site's weighted update: the step is sized so that "
                         "the error std is at most --max-error-ratio of it (default with --lr and --local-steps: "
                         "lr x sqrt(steps) / sites)")
    he.add_argument("--lr", type=float, help="the plan's Adam learning rate (with --local-steps: bound and noise; default: none)")
    he.add_argument("--local-steps", type=int, help="the plan's optimizer steps per round (default: none)")
    he.add_argument("--max-error-ratio", type=float, default=0.01,
                    help="quantisation error std / DP noise std the plan allows (default 0.01)")
    he.add_argument("--quant-bits", type=int,
                    help="step = bound / 2**bits (default: from the plan's noise, else 16)")
    he.add_argument("--rounding", choices=["stochastic", "nearest"], default="stochastic",
                    help="how values are rounded to the quantisation step")
    he.add_argument("--poly-modulus-degree", type=int, default=8192,
                    help="CKKS ring dimension N (N/2 slots per ciphertext)")
    he.add_argument("--seed", type=int, default=0, help="seed of the random values")
    he.add_argument("--json", action="store_true", help="print one JSON line")
    he.set_defaults(handler=_cmd_bench_he)


def _count(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 1e6)") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number of values")
    return int(value)


def run_he_bench(
    *,
    params: int,
    sites: int = 3,
    rounds: int = 5,
    bound: float | None = None,
    quant_bits: int | None = None,
    rounding: str = "stochastic",
    poly_modulus_degree: int = 8192,
    seed: int = 0,
    noise_std: float | None = None,
    lr: float | None = None,
    local_steps: int | None = None,
    max_error_ratio: float = 0.01,
) -> dict[str, Any]:
    """Encrypt ``params`` values at each of ``sites`` sites, sum them as the server does, decrypt.

    With ``noise_std`` (or ``lr`` and ``local_steps``) the quantisation comes from the update plan
    (``he/quantplan.py``) unless ``quant_bits`` fixes it; otherwise 16 bits within ``bound`` (1.0).
    """
    import numpy as np

    from fedfms_secure.he.ckks import context_fingerprint, load_context, new_secret_context, serialize_params_only
    from fedfms_secure.he.codec import PackedCkksCodec
    from fedfms_secure.he.packing import choose_params, noise_bound
    from fedfms_secure.he.aggregate import PackedCkksAggregator
    from fedfms_secure.he.quantplan import UpdatePlan, plan_params
    from fedfms_secure.errors import ConfigError

    if sites < 1 or params < 1:
        raise ConfigError("bench he needs --params >= 1 and --sites >= 1")
    plan = None
    if noise_std is not None or lr is not None or local_steps is not None:
        plan = UpdatePlan(lr=lr, local_steps=local_steps, sites=sites, rounds=rounds, bound=bound,
                          noise_std=noise_std, error_ratio=max_error_ratio)
        bound, noise_std = plan.update_bound, plan.weighted_noise_std
    bound = 1.0 if bound is None else bound
    if plan is not None and quant_bits is None:
        ckks = plan_params(plan, rounding=rounding, poly_modulus_degree=poly_modulus_degree)
    else:
        bits = 16 if quant_bits is None else quant_bits
        ckks = choose_params(bound=bound, sites=sites, rounds=rounds, quant_bits=bits, rounding=rounding,
                             poly_modulus_degree=poly_modulus_degree)
    quant_bits = ckks.packing.quant_bits
    ctx = new_secret_context(ckks)
    fingerprint = context_fingerprint(ctx)
    codec = PackedCkksCodec(ctx, fingerprint, ckks, rng=np.random.default_rng(seed + 1))
    aggregator = PackedCkksAggregator(load_context(serialize_params_only(ctx), source="bench"), fingerprint, ckks)
    rng = np.random.default_rng(seed)
    step = codec.chunk_values
    enc_s = sum_s = dec_s = 0.0
    up_bytes = down_bytes = 0
    max_err, sq_err = 0.0, 0.0
    for start in range(0, params, step):  # chunk by chunk, as the daemons stream: memory O(chunk)
        n = min(step, params - start)
        values = [rng.uniform(-bound, bound, n) for _ in range(sites)]
        total = None
        for part in values:
            t0 = time.perf_counter()
            payload = codec.encrypt_vector(part)[0]
            t1 = time.perf_counter()
            chunk = aggregator.parse(payload)
            total = chunk if total is None else aggregator.add(total, chunk)
            t2 = time.perf_counter()
            enc_s += t1 - t0
            sum_s += t2 - t1
            up_bytes += len(payload)
        t0 = time.perf_counter()
        dumped = aggregator.dump(total)
        t1 = time.perf_counter()
        decoded = codec.decrypt_vector([dumped], n)
        t2 = time.perf_counter()
        sum_s += t1 - t0
        dec_s += t2 - t1
        down_bytes += len(dumped)
        err = decoded - np.sum(values, axis=0)
        max_err = max(max_err, float(np.max(np.abs(err))))
        sq_err += float(np.sum(err**2))
    packing = ckks.packing
    per_value = packing.step / 2 if rounding == "nearest" else packing.step
    return {
        "params": params,
        "bytes_per_param": up_bytes / sites / params,
        "encrypt_s": enc_s / sites,
        "decrypt_s": dec_s,
        "sum_s_per_site": sum_s / sites,
        "max_abs_error": max_err,
        "error_std": math.sqrt(sq_err / params),
        # the K-site sum's error against the DP noise the K weighted updates carry (sqrt(K) x noise_std)
        "noise_std": noise_std,
        "error_to_noise": None if noise_std is None else math.sqrt(sq_err / params) / (math.sqrt(sites) * noise_std),
        "error_bound": sites * per_value,
        "ckks_error_bound_units": noise_bound(sites, ckks.coeff_mod_bit_sizes[0]) / ckks.scale,
        "bytes_per_param_sum": down_bytes / params,
        "sites": sites,
        "rounds": rounds,
        "bound": bound,
        "quant_bits": quant_bits,
        "step": packing.step,
        "rounding": rounding,
        "lanes": packing.lanes,
        "lane_bits": packing.lane_bits,
        "poly_modulus_degree": ckks.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(ckks.coeff_mod_bit_sizes),
        "scale_bits": ckks.scale_bits,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }


def _cmd_bench_he(args: argparse.Namespace) -> int:
    result = run_he_bench(
        params=args.params, sites=args.sites, rounds=args.rounds, bound=args.bound, quant_bits=args.quant_bits,
        rounding=args.rounding, poly_modulus_degree=args.poly_modulus_degree, seed=args.seed,
        noise_std=args.noise_std, lr=args.lr, local_steps=args.local_steps, max_error_ratio=args.max_error_ratio,
    )
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for key, value in result.items():
            print(f"{key:>22}  {value}", file=sys.stdout)
    return 0
