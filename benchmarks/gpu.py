"""SAM vit_b training on one device: images/s, s/step and peak memory per mode, DP and input size,
and one round's CKKS encoding against its training time.

Each row trains ``train_local`` (the function sites use) for ``--steps`` steps of ``--batch``
synthetic slices (noisy bright ellipses at the row's size) after one warm-up step, in a fresh
process, so that its peak memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU, the
process's peak resident set (``ru_maxrss``, model and Python included) on the CPU. DP rows use
DP-SGD as a site does (Opacus, Poisson sampling at ``batch / images``, per-sample clipping, noise
in secure mode; the privacy unit is the slice here, a record costs one slice either way), with
the standard per-sample gradients ("standard") or Opacus' ghost clipping ("ghost").

The CKKS column encrypts one update of the row's length (the vector the mode communicates at that
size, values uniform in the codec's bound) with the packed codec the demo provisions (3 sites x 5
rounds of headroom), on the CPU as sites do; "round" is ``--round-steps`` training steps.

    python -m benchmarks.gpu                  # on a GPU: vit_b fedmsa/fedsam x DP x 256/1024 px
    python -m benchmarks.gpu --device cpu     # the reduced CPU set: 128 px, 2 steps of 2
    python -m benchmarks.gpu --quick          # tiny preset, seconds (the test's run)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import _common

#: the full set on a GPU: (mode, DP clipping or None, image size, batch); batches sized for one 80 GB GPU
GPU_ROWS = [(mode, dp, size, 8 if size == 256 else 2)
            for size in (256, 1024) for mode in ("fedmsa", "fedsam") for dp in (None, "standard")]
GPU_ROWS += [("fedmsa", "ghost", size, 8 if size == 256 else 2) for size in (256, 1024)]
#: the reduced set on a CPU: what 2 cores do in minutes
CPU_ROWS = [("fedmsa", None, 128, 2), ("fedmsa", "standard", 128, 2), ("fedmsa", "ghost", 128, 2)]
QUICK_ROWS = [("fedmsa", None, 64, 2), ("fedmsa", "standard", 64, 2), ("fedmsa", "ghost", 64, 2)]


@dataclass(frozen=True)
class Row:
    preset: str
    mode: str
    clipping: str | None  # DP-SGD's clipping ("standard", "ghost"), None without DP
    size: int
    batch: int
    steps: int
    device: str
    threads: int = 2

    @property
    def dp(self) -> bool:
        return self.clipping is not None


def _train_row(row: Row, tmp: str) -> dict[str, Any]:
    """One row, measured in this (fresh) process."""
    import torch

    from fedfms_secure.data.synth import ellipses
    from fedfms_secure.device import resolve_device
    from fedfms_secure.model import apply_mode, build_model
    from fedfms_secure.privacy import PrivacyConfig, SitePrivacy
    from fedfms_secure.train import TrainConfig, train_local

    torch.set_num_threads(row.threads)
    device = resolve_device(row.device)
    model = build_model(row.preset, seed=0, pretrained=False, img_size=row.size)
    model.to(device)
    apply_mode(model, row.mode)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = row.batch * row.steps
    data = ellipses(n, size=row.size)
    warm = ellipses(row.batch, size=row.size, seed=1)

    def privacy(name: str, images: int, steps: int) -> SitePrivacy | None:
        if not row.dp:
            return None
        return SitePrivacy.open(Path(tmp) / name, PrivacyConfig(unit="slice"), sample_rate=row.batch / images,
                                planned_steps=steps)  # fmt: skip

    def config(steps: int) -> TrainConfig:
        return TrainConfig(epochs=1, batch_size=row.batch, lr=1e-4, max_physical_batch=row.batch,
                           clipping=row.clipping or "standard")  # fmt: skip

    train_local(model, warm, config(1), privacy("warm", row.batch, 1))  # allocations, first-call overheads
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    drawn = _Counter(data)
    start = time.perf_counter()
    result = train_local(model, drawn, config(row.steps), privacy("timed", n, row.steps))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"trainable": trainable, "seconds": seconds, "steps": result.steps, "images": drawn.drawn,
            "peak_mb": peak_mb, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


class _Counter(__import__("torch").utils.data.Dataset):
    """Counts the items drawn, so Poisson-sampled DP steps are measured by what they process."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.drawn = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        self.drawn += 1
        return self.base[index]


def _child(row: Row, queue: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            queue.put(_train_row(row, tmp))
        except Exception as exc:  # noqa: BLE001 - reported as the row's result
            queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_row(row: Row) -> dict[str, Any]:
    """Measures ``row`` in a fresh process (its peak memory is its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(row, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def ckks_encode_seconds(length: int) -> float:
    """Seconds to encrypt one update of ``length`` values with the demo's packed codec (CPU)."""
    import numpy as np

    from fedfms_secure.he.ckks import context_fingerprint, new_secret_context
    from fedfms_secure.he.codec import PackedCkksCodec
    from fedfms_secure.he.packing import DEFAULT_UPDATE_BOUND, fit_params

    params = fit_params(bound=DEFAULT_UPDATE_BOUND, sites=3, rounds=5)
    ctx = new_secret_context(params)
    codec = PackedCkksCodec(ctx, context_fingerprint(ctx), params, rng=np.random.default_rng(1))
    rng = np.random.default_rng(0)
    step = codec.chunk_values
    seconds = 0.0
    for start in range(0, length, step):
        part = rng.uniform(-DEFAULT_UPDATE_BOUND, DEFAULT_UPDATE_BOUND, min(step, length - start))
        t0 = time.perf_counter()
        codec.encrypt_vector(part)
        seconds += time.perf_counter() - t0
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU when present), cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, help="timed steps per row (default: 5 on a GPU, 2 on the CPU)")
    parser.add_argument("--round-steps", type=int, default=30,
                        help="training steps of one round, for the CKKS comparison (default: 30)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of torch (default: 2)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 64 px, one step: a smoke test")
    parser.add_argument("--out", type=Path, default=_common.RESULTS / "gpu.md")
    args = parser.parse_args(argv)
    from fedfms_secure.device import resolve_device
    from fedfms_secure.server.plan_sizes import plan_vector_length

    device = resolve_device(args.device)
    preset = "tiny" if args.quick else "vit_b"
    table = QUICK_ROWS if args.quick else GPU_ROWS if device.type == "cuda" else CPU_ROWS
    steps = args.steps or (1 if args.quick else 5 if device.type == "cuda" else 2)
    rows = [Row(preset, mode, clipping, size, batch, steps, str(device), args.threads)
            for mode, clipping, size, batch in table]  # fmt: skip
    progress = _common.Progress(len(rows))
    encode: dict[tuple[str, int], float] = {}
    results = []
    for row in rows:
        progress.start(f"{row.preset} {row.mode} DP={row.clipping or 'no'} {row.size} px batch {row.batch}")
        measured = run_row(row)
        key = (row.mode, row.size)
        if key not in encode and "error" not in measured:
            encode[key] = ckks_encode_seconds(plan_vector_length(row.preset, row.mode, row.size))
        progress.finish(measured.get("error", ""))
        results.append((row, measured))
    head = _common.header(seeds=0, argv=_common.script_argv(__file__, argv), device=str(device),
                          threads=args.threads)  # fmt: skip
    lines = [
        f"# SAM {preset} training on {'a GPU' if device.type == 'cuda' else 'the CPU'}: speed, memory and CKKS",
        "",
        *_common.header_markdown(head),
        "",
        f"Each row: `train_local` for {steps} step(s) after a warm-up step, in a fresh process; peak memory is "
        + ("`torch.cuda.max_memory_allocated` of the timed steps." if device.type == "cuda" else
           "the process's peak resident set (model, Python and torch included; no GPU was available)."),
        f"CKKS: one update of the row's length encrypted on the CPU (packed codec, 3 sites x 5 rounds of "
        f"headroom); round = {args.round_steps} training steps.",
        "",
        "| mode | DP | px | batch | trainable | images/s | s/step | peak MB | CKKS encode s | encode / round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, m in results:
        if "error" in m:
            lines.append(f"| {row.mode} | {row.clipping or 'no'} | {row.size} | {row.batch} | | failed: "
                         f"{m['error'][:120]} | | | | |")
            continue
        per_step = m["seconds"] / m["steps"]
        enc = encode[(row.mode, row.size)]
        lines.append(f"| {row.mode} | {row.clipping or 'no'} | {row.size} | {row.batch} | {m['trainable']:,} | "
                     f"{m['images'] / m['seconds']:.2f} | {per_step:.2f} | {m['peak_mb']:.0f} | {enc:.2f} | "
                     f"{enc / (per_step * args.round_steps):.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("error" not in m for _, m in results) else 1


__all__ = ["CPU_ROWS", "GPU_ROWS", "Row", "ckks_encode_seconds", "main", "run_row"]

if __name__ == "__main__":
    raise SystemExit(main())
