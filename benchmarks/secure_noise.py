"""What the cryptographic noise source costs: one DP-SGD step's noise, secure_mode on and off.

    .venv/bin/python benchmarks/secure_noise.py [--repeats 7] [--out benchmarks/results]

Sites draw DP-SGD noise from a torch generator whose state comes from ``os.urandom``
(``fedfms_secure.privacy.units.entropy_generator``) in Opacus' ``secure_mode`` (each value is the
sum of four Gaussian draws, robust to floating-point attacks on the sampler). This times, on the
CPU in process CPU seconds (torch on one thread), the noise of one step for the trainable
parameters of the tiny preset (FedMSA and FedSAM) and of vit_b FedMSA (10.74M), with secure_mode
on and off, and the cost of making an entropy-seeded generator. Each time is the fastest of
``--repeats``. Writes ``secure_noise.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from opacus.optimizers.optimizer import _generate_noise

from benchmarks import _common
from fedfms_secure.model import apply_mode, build_model
from fedfms_secure.privacy.units import entropy_generator


def _trainable(mode: str) -> int:
    model = build_model("tiny", pretrained=False)
    apply_mode(model, mode)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    head = _common.header(argv=_common.script_argv(__file__, argv))
    sizes = [("tiny FedMSA", _trainable("fedmsa")), ("tiny FedSAM", _trainable("fedsam")),
             ("vit_b FedMSA", 10_740_000)]
    rows = []
    for name, n in sizes:
        ref = torch.zeros(n)
        gen = entropy_generator()
        plain = _best(lambda: _generate_noise(1.0, ref, gen, secure_mode=False), args.repeats)
        secure = _best(lambda: _generate_noise(1.0, ref, gen, secure_mode=True), args.repeats)
        rows.append((name, n, plain, secure))
        print(f"{name}: {n} values, plain {plain * 1e3:.2f} ms, secure {secure * 1e3:.2f} ms", flush=True)
    seeding = _best(entropy_generator, args.repeats * 10)
    lines = ["# Cost of the cryptographic noise source", "", *_common.header_markdown(head), "",
             "Noise of one DP-SGD step (CPU seconds, one thread, fastest of the repeats):", "",
             "| trainable parameters | values | plain (ms) | secure_mode (ms) | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, n, plain, secure in rows:
        lines.append(f"| {name} | {n:,} | {plain * 1e3:.2f} | {secure * 1e3:.2f} | {secure / plain:.1f}x |")
    lines += ["", f"Making one entropy-seeded generator (19968 bits from os.urandom): {seeding * 1e3:.3f} ms "
              "(twice per local training: sampler and noise).", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "secure_noise.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
