"""Bytes per site per round, FedSAM against FedMSA, plaintext against packed CKKS: measured, not multiplied.

    .venv/bin/python -m benchmarks.communication [--presets tiny vit_b] [--modes fedmsa fedsam]
                                                 [--sites 3] [--rounds 5] [--out benchmarks/results]

For each preset and mode the model is built (vit_b from its seeded initialisation: the parameter
counts are those of the official architecture, no checkpoint needed) and its communicated vector
is cut out by ``apply_mode``. Then one round is played for ``--sites`` sites with the codecs the
daemons use, chunk by chunk as they stream:

* up, per site: the ``CommitWeightRequest`` (E(n_k)) and every ``Chunk`` of the upload, each
  encoded by the site codec (``make_site_codec``) and converted with ``transport.serde``;
* down, per site: the ``GetWeightTotalResponse`` (E(N)) and every ``Chunk`` of the next global
  state, which the server makes by adding the sites' chunks (``make_aggregator``) and dumping the sum.

Sizes are ``ByteSize()`` of the real protobuf messages, as the site's byte counter counts them
(gRPC, HTTP/2 and TLS framing not included; nor the status polls and metric reports, a few
hundred bytes a round). Schemes:

* ``ckks``  packed CKKS with the parameters ``fedfms-secure demo`` provisions: ``plan_params`` for
  the demo plan (Adam lr 3e-3, 15-25 local steps a round, DP; ``he/quantplan.py``), the given
  sites and rounds: what travels by default;
* ``plain`` the ``--no-he`` baseline as the code sends it (float64 payloads);
* ``fp32``  reference: the same chunks with float32 payloads, i.e. plaintext FedAvg at 4 B/param.

The update values are small Gaussians (std 1e-3, clipped to the bound); CKKS ciphertext sizes do
not depend on them. Writes ``communication.json`` and ``communication.md`` (``--name`` changes
the stem).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common

SCHEMES = ("fp32", "plain", "ckks")
SCHEME_LABELS = {
    "fp32": "plaintext fp32 (reference)",
    "plain": "plaintext fp64 (`--no-he`)",
    "ckks": "packed CKKS (default)",
}
FP32_CHUNK_VALUES = 4096  # the plain codec's chunk: the fp32 reference differs in payload width only


@dataclass
class ModelCounts:
    preset: str
    mode: str
    total: int
    trainable: int
    communicated: int


def count_parameters(preset: str, mode: str) -> ModelCounts:
    """Builds ``preset`` and returns its parameter counts in ``mode`` (``mode_summary``)."""
    import logging

    from fedfms_secure.model import build_model
    from fedfms_secure.model.modes import mode_summary

    logging.getLogger("fedfms_secure.model").setLevel(logging.ERROR)  # vit_b: "random initialisation"
    model = build_model(preset, seed=0, pretrained=None if preset == "tiny" else False)
    summary = mode_summary(model, mode)
    del model
    return ModelCounts(preset, mode, summary["total"], summary["trainable"], summary["communicated"])


class _Fp32Codec:
    """The fp32 reference: float32 payloads in the plain codec's chunks (no --no-he federation sends these)."""

    scheme = "fp32"
    fingerprint = "plain"
    chunk_values = FP32_CHUNK_VALUES

    def encrypt_vector(self, vec: np.ndarray) -> list[bytes]:
        return [vec[i : i + self.chunk_values].astype("<f4").tobytes() for i in range(0, vec.size, self.chunk_values)]

    def encrypt_scalar(self, x: float) -> bytes:
        return np.array([x], dtype="<f4").tobytes()


class _Fp32Summer:
    chunk_values = FP32_CHUNK_VALUES

    def parse(self, payload: bytes) -> np.ndarray:
        return np.frombuffer(payload, dtype="<f4").astype(np.float64)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def dump(self, obj: np.ndarray) -> bytes:
        return obj.astype("<f4").tobytes()


# the demo's plan: Adam's learning rate and the fewest and most local steps of its sites in a round
DEMO_LR = 3e-3
DEMO_STEPS = (15, 25)


def _parties(scheme: str, sites: int, rounds: int) -> tuple[list[Any], Any, dict[str, Any]]:
    """(one codec per site, the server's aggregator, what was provisioned) for ``scheme``."""
    from fedfms_secure.he import (
        context_fingerprint,
        load_context,
        make_site_codec,
        make_aggregator,
        new_secret_context,
        serialize_params_only,
        serialize_site_context,
    )
    from fedfms_secure.he.quantplan import UpdatePlan, plan_params

    if scheme == "fp32":
        return [_Fp32Codec() for _ in range(sites)], _Fp32Summer(), {}
    if scheme == "plain":
        return [make_site_codec("plain", None, "plain") for _ in range(sites)], make_aggregator("plain", None), {}
    params = plan_params(UpdatePlan(lr=DEMO_LR, local_steps=DEMO_STEPS[1], min_local_steps=DEMO_STEPS[0],
                                    sites=sites, rounds=rounds))
    ctx = new_secret_context(params)
    fingerprint = context_fingerprint(ctx)
    site_blob = serialize_site_context(ctx)
    codecs = []
    for _ in range(sites):  # each site loads its own copy of the bundle's context
        site_ctx = load_context(site_blob, source="communication benchmark")
        codecs.append(make_site_codec("ckks", site_ctx, fingerprint, params=params))
    aggregator = make_aggregator("ckks", load_context(serialize_params_only(ctx), source="server"), fingerprint, params)
    packing = params.packing
    info = {
        "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
        "poly_modulus_degree": params.poly_modulus_degree,
        "scale_bits": params.scale_bits,
        "quant_bits": packing.quant_bits,
        "lanes": packing.lanes,
        "lane_bits": packing.lane_bits,
        "bound": packing.bound,
    }
    return codecs, aggregator, info


def _chunk_proto(round_: int, index: int, total: int, payload: bytes, count: int, length: int,
                 fingerprint: str) -> Any:  # fmt: skip
    from fedfms_secure.protocol import Chunk
    from fedfms_secure.transport import serde

    return serde.chunk_to_proto(Chunk(round=round_, index=index, total=total, num_values=count,
                                      fingerprint=fingerprint, payload=payload, vector_length=length))  # fmt: skip


def measure_round(length: int, scheme: str, *, sites: int = 3, rounds: int = 5, seed: int = 0,
                  weights: Sequence[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Plays one round of ``sites`` sites sending ``length`` values each under ``scheme``; returns bytes and seconds.

    Up and down bytes are per site (the same for every site up to a few bytes of varint). Memory
    stays at one chunk per site plus the running sum, as in the daemons.
    """
    from fedfms_secure.v1 import federation_pb2 as pb

    if length < 1 or sites < 1:
        from fedfms_secure.errors import ConfigError

        raise ConfigError(f"need at least one value and one site (got {length} values, {sites} sites)")
    codecs, aggregator, info = _parties(scheme, sites, rounds)
    fingerprint = codecs[0].fingerprint
    counts = list(weights) if weights is not None else [100 + 10 * k for k in range(sites)]
    rng = np.random.default_rng(seed)
    round_ = 1
    # commit: E(n_k) up; the server sums them and every site downloads E(N)
    commit_up = []
    scalar_sum = None
    for codec, n in zip(codecs, counts):
        payload = codec.encrypt_scalar(float(n))
        commit_up.append(pb.CommitWeightRequest(round=round_, context_fingerprint=fingerprint,
                                                encrypted_weight=payload).ByteSize())  # fmt: skip
        parsed = aggregator.parse(payload)
        scalar_sum = parsed if scalar_sum is None else aggregator.add(scalar_sum, parsed)
    total_down = pb.GetWeightTotalResponse(ready=True, round=round_, context_fingerprint=fingerprint,
                                           encrypted_total=aggregator.dump(scalar_sum),
                                           participants=sites).ByteSize()  # fmt: skip
    step = codecs[0].chunk_values
    chunks = math.ceil(length / step)
    upload = [0] * sites
    global_down = 0
    encrypt_s = sum_s = 0.0
    bound = getattr(codecs[0], "bound", None) or math.inf
    for index in range(chunks):
        count = min(step, length - index * step)
        running = None
        for k, codec in enumerate(codecs):
            values = np.clip(rng.normal(0.0, 1e-3, count), -bound, bound)
            t0 = time.perf_counter()
            payload = codec.encrypt_vector(values)[0]
            t1 = time.perf_counter()
            upload[k] += _chunk_proto(round_, index, chunks, payload, count, length, fingerprint).ByteSize()
            parsed = aggregator.parse(payload)
            running = parsed if running is None else aggregator.add(running, parsed)
            t2 = time.perf_counter()
            encrypt_s += t1 - t0
            sum_s += t2 - t1
        t0 = time.perf_counter()
        dumped = aggregator.dump(running)
        sum_s += time.perf_counter() - t0
        global_down += _chunk_proto(round_ + 1, index, chunks, dumped, count, length, fingerprint).ByteSize()
    up = [u + c for u, c in zip(upload, commit_up)]
    up_site = float(np.mean(up))
    down_site = float(global_down + total_down)
    return {
        "scheme": scheme,
        "values": length,
        "sites": sites,
        "rounds_provisioned": rounds,
        "chunks": chunks,
        "chunk_values": step,
        "bytes_up_per_site": up_site,
        "bytes_down_per_site": down_site,
        "bytes_up_per_param": up_site / length,
        "bytes_down_per_param": down_site / length,
        "upload_bytes_per_site": float(np.mean(upload)),
        "commit_bytes_per_site": float(np.mean(commit_up)),
        "global_state_bytes": float(global_down),
        "weight_total_bytes": float(total_down),
        "encrypt_s_per_site": encrypt_s / sites,
        "server_s": sum_s,
        **({"ckks": info} if info else {}),
    }


def run(presets: Sequence[str], modes: Sequence[str], *, sites: int, rounds: int, seed: int = 0,
        schemes: Sequence[str] = SCHEMES, stream: Any = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every (preset, mode, scheme) row."""
    jobs = [(p, m) for p in presets for m in modes]
    progress = _common.Progress(len(jobs) * len(schemes), stream)
    rows = []
    for preset, mode in jobs:
        counts = count_parameters(preset, mode)
        for scheme in schemes:
            progress.start(f"{preset} {mode} {scheme}: {counts.communicated:,} values x {sites} sites")
            result = measure_round(counts.communicated, scheme, sites=sites, rounds=rounds, seed=seed)
            rows.append({"preset": preset, "mode": mode, "total_params": counts.total,
                         "trainable_params": counts.trainable, "communicated_params": counts.communicated,
                         **result})  # fmt: skip
            progress.finish(f"({result['bytes_up_per_param']:.3f} B/param up)")
    return rows


def markdown(head: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    fp32 = {(r["preset"], r["mode"]): r for r in rows if r["scheme"] == "fp32"}
    ckks = next((r["ckks"] for r in rows if r["scheme"] == "ckks"), None)
    lines = [
        "# Bytes per site per round: FedSAM and FedMSA, plaintext and packed CKKS",
        "",
        *_common.header_markdown(head),
    ]
    if ckks:
        lines.append(
            f"- CKKS parameters (`plan_params` for the demo plan, lr {DEMO_LR:g}, {DEMO_STEPS[0]}-{DEMO_STEPS[1]} local "
            f"steps, DP, as `fedfms-secure demo` provisions them): N={ckks['poly_modulus_degree']}, "
            f"primes {ckks['coeff_mod_bit_sizes']}, scale 2^{ckks['scale_bits']}, {ckks['quant_bits']}-bit "
            f"quantisation, {ckks['lanes']} lanes x {ckks['lane_bits']} bits, bound {ckks['bound']:g}"
        )
    lines += [
        "",
        "Measured by encoding (and encrypting) every chunk with the site codec and summing the "
        "`ByteSize()` of the real protobuf messages: up = `CommitWeightRequest` + the upload's `Chunk`s, "
        "down = `GetWeightTotalResponse` + the next global state's `Chunk`s (the server's sum of the sites' "
        "chunks). gRPC/HTTP-2/TLS framing, status polls and metric reports are not counted.",
        "",
        "| preset | mode | trainable params | communicated params | scheme | chunks | up / site / round "
        "| down / site / round | up B/param | down B/param | up vs fp32 | encrypt s / site | server s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ref = fp32.get((r["preset"], r["mode"]))
        ratio = f"{r['bytes_up_per_site'] / ref['bytes_up_per_site']:.2f}x" if ref else "-"
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['trainable_params']:,} | {r['communicated_params']:,} "
            f"| {SCHEME_LABELS[r['scheme']]} | {r['chunks']:,} | {_si(r['bytes_up_per_site'])} "
            f"| {_si(r['bytes_down_per_site'])} | {r['bytes_up_per_param']:.3f} | {r['bytes_down_per_param']:.3f} "
            f"| {ratio} | {r['encrypt_s_per_site']:.2f} | {r['server_s']:.2f} |"
        )
    lines += [
        "",
        "Up is what one site sends in one round; down is what it receives (the global state that closes the "
        "round). A CKKS upload is a seeded ciphertext (one polynomial and a seed); the global state is a sum, "
        "so it carries both polynomials and costs about twice as much. FedMSA sends the adapters and the mask "
        "decoder; FedSAM all of SAM. Multiply by rounds for a whole run: every round ends with the download of "
        "the new global state (theta_0 itself is public and never travels).",
        "",
    ]
    return "\n".join(lines)


def _si(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "vit_b"], help="model presets (default: tiny vit_b)")
    parser.add_argument("--modes", nargs="+", default=["fedmsa", "fedsam"], choices=["fedmsa", "fedsam"])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--sites", type=int, default=3, help="sites in the federation (default 3, as the demo)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the CKKS parameters allow (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=_common.RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--name", default="communication", help="stem of the output files (default communication)")
    args = parser.parse_args(argv)
    from fedfms_secure.errors import FedFmsError
    from fedfms_secure.model.registry import PRESETS

    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    if args.sites < 1 or args.rounds < 1:
        parser.error("--sites and --rounds must be at least 1")
    head = _common.header(seeds=args.seed, argv=_common.script_argv(__file__, argv),
                          sites=args.sites, rounds_provisioned=args.rounds)  # fmt: skip
    started = time.monotonic()
    try:
        rows = run(args.presets, args.modes, sites=args.sites, rounds=args.rounds, seed=args.seed,
                   schemes=args.schemes)  # fmt: skip
    except FedFmsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    head["runtime"] = f"{time.monotonic() - started:.0f} s"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"header": head, "rows": rows}, indent=2) + "\n")
    text = markdown(head, rows)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
