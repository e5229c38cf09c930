"""Packed CKKS against NVFlare's own HE path: bytes per parameter, aggregation time, peak memory.

    .venv/bin/python -m benchmarks.he_vs_nvflare [--values 11160000] [--sites 3] [--per-layer]
                                                  [--venv build/nvflare-venv] [--out benchmarks/results]

NVFlare runs in its own virtual environment (``--venv``, made and filled with ``pip install
nvflare tenseal`` on first use; PyPI must be reachable, else the script says so and stops without
writing results). Its HE path is used as NVFlare ships it: the context of its ``HEBuilder``
(TenSEAL CKKS, N = 8192, [60, 40, 40], scale 2^40, symmetric encryption, relinearisation keys),
``HEModelEncryptor.encryption`` at each site (one value per slot) and
``HEInTimeAccumulateWeightedAggregator`` (``accept`` per site, then ``aggregate``) at the server.
This package's side: the demo plan's packing (``he/quantplan.py``: Adam lr 3e-3, 15-25 local
steps, K sites x 5 rounds), ``PackedCkksCodec`` at the sites and ``PackedCkksAggregator`` at the
server. Both sides encrypt the same K random updates of ``--values`` values (uniform within the
plan's bound): as one flat vector, or with ``--per-layer`` split at the layer sizes of vit_b
FedMSA's communicated parameters (NVFlare encrypts each layer as its own vector).

Each aggregation runs in a fresh process that reads the K uploads from files, so that its peak
resident memory (``VmHWM``, reset after the imports) and time are the server's alone: parse + add for every site, then
the final step (NVFlare: multiply by 1/count; packed: serialize the sum). Bytes are the serialized
ciphertexts (NVFlare's FOBS/pickle framing not counted). Writes ``he_vs_nvflare.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from benchmarks import _common

ROOT = _common.ROOT
NVFLARE = "nvflare==2.9.0"
DEMO_PLAN = {"lr": 3e-3, "local_steps": 25, "min_local_steps": 15, "rounds": 5}

# runs inside the NVFlare venv: encrypt at K sites (NVFlare's encryptor), write the uploads
NVFLARE_ENCRYPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np, tenseal as ts
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_opt.he.decomposers import CKKSVectorDecomposer
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
    folder, values, sites, sizes, bound = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), float(sys.argv[5])
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)  # as NVFlare's HEBuilder makes it
    ctx.generate_relin_keys()
    ctx.global_scale = 2**40
    rng = np.random.default_rng(0)
    up, up_fobs, enc_s, sums = 0, 0, 0.0, None
    for k in range(sites):
        flat = rng.uniform(-bound, bound, values)
        sums = flat if sums is None else sums + flat
        params, start = {}, 0
        for i, n in enumerate(sizes):
            params[f"layer{i}"] = flat[start:start + n]
            start += n
        enc = HEModelEncryptor(weigh_by_local_iter=False)
        enc.tenseal_context = ctx  # what its START_RUN handler does, without a workspace
        if enc.encrypt_layers is None:
            enc.encrypt_layers = [True]
        t0 = time.perf_counter()
        out, keys = enc.encryption(params, FLContext())
        enc_s += time.perf_counter() - t0
        site = folder / f"site{k}"
        site.mkdir()
        for name, vec in out.items():  # what NVFlare's FOBS decomposer sends: the vector and its context
            blob, ctx_blob = CKKSVectorDecomposer().decompose(vec)
            up += len(blob)
            up_fobs += len(blob) + len(ctx_blob)
            (site / name).write_bytes(blob)
            (site / (name + ".ctx")).write_bytes(ctx_blob)
    np.save(folder / "expected.npy", sums / sites)
    ctx_secret = ctx.serialize(save_secret_key=True)
    (folder / "secret.ctx").write_bytes(ctx_secret)
    print(json.dumps({"bytes_per_param": up / sites / values, "bytes_per_param_fobs": up_fobs / sites / values,
                      "encrypt_s": enc_s / sites}))
""")

# runs inside the NVFlare venv, in a fresh process: NVFlare's aggregator over the K uploads
NVFLARE_AGGREGATE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np, tenseal as ts
    from nvflare.apis.dxo import DXO, DataKind, MetaKey
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_opt.he.constant import HE_ALGORITHM_CKKS
    from nvflare.app_opt.he.decomposers import CKKSVectorDecomposer
    from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
    folder, sites, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    agg = HEInTimeAccumulateWeightedAggregator()
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    agg.handle_event(EventType.START_RUN, fl_ctx)
    rss0 = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmRSS"].split()[0])
    with open("/proc/self/clear_refs", "w") as fh:  # restart the peak (VmHWM) after the imports
        fh.write("5")
    t0 = time.perf_counter()
    for k in range(sites):
        names = [f"layer{i}" for i in range(layers)]
        # received as NVFlare's FOBS decomposer rebuilds them: each vector with its own context
        data = {n: CKKSVectorDecomposer().recompose(((folder / f"site{k}" / n).read_bytes(),
                                                     (folder / f"site{k}" / (n + ".ctx")).read_bytes()))
                for n in names}
        dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data=data,
                  meta={MetaKey.PROCESSED_KEYS: {n: True for n in names},
                        MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM_CKKS, MetaKey.NUM_STEPS_CURRENT_ROUND: 1})
        shareable = dxo.to_shareable()
        shareable.set_peer_props({ReservedKey.IDENTITY_NAME: f"site{k}"})
        shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
        if not agg.accept(shareable, fl_ctx):
            raise SystemExit(f"NVFlare's aggregator refused site {k}")
    result = agg.aggregate(fl_ctx)
    seconds = time.perf_counter() - t0
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    hwm = int(status["VmHWM"].split()[0])
    from nvflare.apis.dxo import from_shareable
    data = from_shareable(result).data
    down = sum(len(v.serialize()) for v in data.values())
    secret = ts.context_from((folder / "secret.ctx").read_bytes())
    got = []
    for i in range(layers):
        vec = data[f"layer{i}"]
        vec.link_context(secret)
        got.append(np.asarray(vec.decrypt()))
    err = np.concatenate(got) - np.load(folder / "expected.npy")
    print(json.dumps({"aggregate_s": seconds, "imports_rss_mb": rss0 / 1024,
                      "aggregation_peak_rss_mb": hwm / 1024, "down_bytes": down, "max_abs_error": float(np.max(np.abs(err))),
                      "error_std": float(np.std(err))}))
""")

# runs in this package's environment, in a fresh process: the packed aggregator over the K uploads
PACKED_AGGREGATE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from fedfms_secure.he.aggregate import PackedCkksAggregator
    from fedfms_secure.he.ckks import CkksParams, load_context
    folder, sites = Path(sys.argv[1]), int(sys.argv[2])
    meta = json.loads((folder / "meta.json").read_text())
    params = CkksParams.from_dict(meta["params"])
    agg = PackedCkksAggregator(load_context((folder / "server.ctx").read_bytes(), source="bench"), meta["fingerprint"], params)
    rss0 = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmRSS"].split()[0])
    with open("/proc/self/clear_refs", "w") as fh:  # restart the peak (VmHWM) after the imports
        fh.write("5")
    t0 = time.perf_counter()
    down = 0
    for layer in range(meta["layers"]):
        for c in range(meta["chunks"][layer]):
            total = None
            for k in range(sites):
                chunk = agg.parse((folder / f"site{k}" / f"{layer}_{c}").read_bytes())
                total = chunk if total is None else agg.add(total, chunk)
            blob = agg.dump(total)
            down += len(blob)
            (folder / "sum" / f"{layer}_{c}").write_bytes(blob)
    seconds = time.perf_counter() - t0
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    hwm = int(status["VmHWM"].split()[0])
    print(json.dumps({"aggregate_s": seconds, "imports_rss_mb": rss0 / 1024,
                      "aggregation_peak_rss_mb": hwm / 1024, "down_bytes": down}))
""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=11_160_000, help="values per site (default vit_b FedMSA's)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--per-layer", action="store_true",
                        help="split the values at vit_b FedMSA's layer sizes (NVFlare: one vector per layer)")
    parser.add_argument("--venv", type=Path, default=ROOT / "build" / "nvflare-venv",
                        help="NVFlare's virtual environment (made on first use)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    python = _nvflare_python(args.venv)
    if python is None:
        return 0
    sizes = _layer_sizes(args.values) if args.per_layer else [args.values]
    head = _common.header(argv=_common.script_argv(__file__, argv), values=args.values, sites=args.sites,
                          layout="per layer (vit_b FedMSA sizes)" if args.per_layer else "one flat vector",
                          nvflare=_version(python))
    with tempfile.TemporaryDirectory(prefix="fedfms-nvflare-") as tmp:
        nv, ours = Path(tmp) / "nvflare", Path(tmp) / "packed"
        nv.mkdir()
        ours.mkdir()
        bound = _plan(args.sites).update_bound
        print("NVFlare: encrypting ...", file=sys.stderr, flush=True)
        nv_enc = _json_run([str(python), "-c", NVFLARE_ENCRYPT, str(nv), str(args.values), str(args.sites),
                            json.dumps(sizes), repr(bound)])
        print("NVFlare: aggregating ...", file=sys.stderr, flush=True)
        nv_agg = _json_run([str(python), "-c", NVFLARE_AGGREGATE, str(nv), str(args.sites), str(len(sizes))])
        print("packed: encrypting ...", file=sys.stderr, flush=True)
        ours_enc, codec = _packed_encrypt(ours, args.values, args.sites, sizes)
        print("packed: aggregating ...", file=sys.stderr, flush=True)
        ours_agg = _json_run([sys.executable, "-c", PACKED_AGGREGATE, str(ours), str(args.sites)],
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        ours_agg.update(_packed_check(ours, codec, args.sites, sizes))
    rows = [
        {"side": "NVFlare HE (TenSEAL CKKS, one value per slot, N 8192, [60, 40, 40], 2^40)", **nv_enc, **nv_agg},
        {"side": f"packed CKKS ({ours_enc.pop('scheme')})", **ours_enc, **ours_agg},
    ]
    for row in rows:
        row["bytes_per_param_down"] = row.pop("down_bytes") / args.values
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_per_layer" if args.per_layer else ""
    (args.out / f"he_vs_nvflare{suffix}.json").write_text(json.dumps({**head, "rows": rows}, indent=2) + "\n")
    (args.out / f"he_vs_nvflare{suffix}.md").write_text(_markdown(head, rows))
    print((args.out / f"he_vs_nvflare{suffix}.md").read_text())
    return 0


def _nvflare_python(venv: Path) -> Path | None:
    """The venv's python with NVFlare importable, installing it on first use; None (said why) if it cannot."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import nvflare.app_opt.he, tenseal"],
                                          capture_output=True).returncode == 0:
        return python
    import tenseal

    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", NVFLARE, f"tenseal=={tenseal.__version__}"],
                       check=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"skipped: NVFlare could not be installed into {venv} ({exc}). It needs PyPI (pip install "
              f"{NVFLARE} tenseal); run again where PyPI is reachable, or make that venv by hand and pass --venv",
              file=sys.stderr)
        return None
    return python


def _version(python: Path) -> str:
    done = subprocess.run([str(python), "-c", "import nvflare; print(nvflare.__version__)"], capture_output=True,
                          text=True)
    return done.stdout.strip() or "unknown"


def _json_run(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plan(sites: int):
    from fedfms_secure.he.quantplan import UpdatePlan

    return UpdatePlan(sites=sites, **DEMO_PLAN)


def _layer_sizes(values: int) -> list[int]:
    """Sizes of vit_b FedMSA's communicated tensors in order (scaled to ``values`` if they differ)."""
    from fedfms_secure.model import apply_mode, build_model

    model = build_model("vit_b", seed=0, pretrained=False)
    names = apply_mode(model, "fedmsa")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    sizes = [int(tensors[n].numel()) for n in names]
    if sum(sizes) != values:
        raise SystemExit(f"--per-layer needs --values {sum(sizes)} (vit_b FedMSA's communicated values)")
    return sizes


def _packed_encrypt(folder: Path, values: int, sites: int, sizes: list[int]) -> tuple[dict, object]:
    import time

    import numpy as np

    from fedfms_secure.he.ckks import context_fingerprint, new_secret_context, serialize_params_only
    from fedfms_secure.he.codec import PackedCkksCodec
    from fedfms_secure.he.quantplan import plan_params

    params = plan_params(_plan(sites))
    ctx = new_secret_context(params)
    fingerprint = context_fingerprint(ctx)
    (folder / "server.ctx").write_bytes(serialize_params_only(ctx))
    codec = PackedCkksCodec(ctx, fingerprint, params, rng=np.random.default_rng(1))
    rng = np.random.default_rng(0)
    up, enc_s, sums = 0, 0.0, None
    chunks = []
    for k in range(sites):
        flat = rng.uniform(-params.packing.bound, params.packing.bound, values)
        sums = flat if sums is None else sums + flat
        site = folder / f"site{k}"
        site.mkdir()
        start = 0
        for layer, n in enumerate(sizes):
            t0 = time.perf_counter()
            payloads = codec.encrypt_vector(flat[start:start + n])
            enc_s += time.perf_counter() - t0
            start += n
            for c, blob in enumerate(payloads):
                up += len(blob)
                (site / f"{layer}_{c}").write_bytes(blob)
            if k == 0:
                chunks.append(len(payloads))
    (folder / "sum").mkdir()
    np.save(folder / "expected.npy", sums / sites)
    (folder / "meta.json").write_text(json.dumps({"params": params.to_dict(), "fingerprint": fingerprint,
                                                  "layers": len(sizes), "chunks": chunks}))
    pk = params.packing
    scheme = (f"{pk.quant_bits} bits within +-{pk.bound:g}, {pk.lanes} lanes x {pk.lane_bits}, "
              f"{list(params.coeff_mod_bit_sizes)}, 2^{params.scale_bits}")
    return {"bytes_per_param": up / sites / values, "encrypt_s": enc_s / sites, "scheme": scheme}, codec


def _packed_check(folder: Path, codec, sites: int, sizes: list[int]) -> dict:
    """Decrypts the packed sums and compares them with the plaintext mean."""
    import numpy as np

    meta = json.loads((folder / "meta.json").read_text())
    got = []
    for layer, n in enumerate(sizes):
        blobs = [(folder / "sum" / f"{layer}_{c}").read_bytes() for c in range(meta["chunks"][layer])]
        got.append(codec.decrypt_vector(blobs, n))
    err = np.concatenate(got) / sites - np.load(folder / "expected.npy")
    return {"max_abs_error": float(np.max(np.abs(err))), "error_std": float(np.std(err))}


def _markdown(head: dict, rows: list[dict]) -> str:
    lines = ["# Packed CKKS against NVFlare's HE path", "", *_common.header_markdown(head), "",
             "| side | B/param up (per site) | up with NVFlare's FOBS context per vector | B/param down (the aggregate) "
             "| encrypt s (per site) | server aggregation s | server RSS after imports MB | server peak RSS while "
             "aggregating MB "
             "| max abs error of the mean | error std |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        fobs = f"{r['bytes_per_param_fobs']:.2f}" if "bytes_per_param_fobs" in r else "-"
        lines.append(f"| {r['side']} | {r['bytes_per_param']:.2f} | {fobs} | {r['bytes_per_param_down']:.2f} | "
                     f"{r['encrypt_s']:.2f} | {r['aggregate_s']:.2f} | {r['imports_rss_mb']:,.0f} | "
                     f"{r['aggregation_peak_rss_mb']:,.0f} | {r['max_abs_error']:.3g} | {r['error_std']:.3g} |")
    lines += ["", "Aggregation: a fresh process reads the K uploads and sums them (NVFlare: `accept` per site, "
              "then `aggregate`, which multiplies by 1/K; packed: parse, add, serialize the sum; the mean is taken "
              "after decryption). Memory: that process's RSS once its imports are done, and its peak from then on "
              "(`VmHWM` after a reset through `/proc/self/clear_refs`; `ru_maxrss` would report the forking "
              "parent's size). NVFlare's FOBS "
              "serializer sends each vector with its context (public and relinearisation keys), which the "
              "FOBS column counts; the server rebuilds that context for every vector it receives. Errors: decrypted "
              "mean against the plaintext mean (packed: the quantisation step sized to the demo plan's DP noise).",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
