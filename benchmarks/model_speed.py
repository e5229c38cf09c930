"""Training speed of the tiny preset on CPU: images/s per mode, with and without DP-SGD.

All rows come from one run on the same machine, so their ratios are comparable. Each row trains
``train_local`` (the function sites use) on 128 synthetic 64x64 slices (noisy bright ellipses),
batch 32, after one warm-up epoch; DP rows use DP-SGD (Opacus, Poisson sampling, per-sample
clipping, epsilon 8 planned over the timed epochs). Images/s counts the images actually drawn
(Poisson batches vary in size).

    python -m benchmarks.model_speed        # writes benchmarks/results/model_speed.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from benchmarks import _common
from fedfms_secure.data.synth import ellipses
from fedfms_secure.device import resolve_device
from fedfms_secure.model import apply_mode, build_model
from fedfms_secure.privacy import PrivacyConfig, SitePrivacy
from fedfms_secure.train import TrainConfig, steps_per_epoch, train_local


class Counting(TensorDataset):
    """Counts the items drawn, so Poisson-sampled DP epochs are measured by what they process."""

    drawn = 0

    def __getitem__(self, index):  # noqa: ANN001
        Counting.drawn += 1
        return super().__getitem__(index)


def measure(mode: str, dp: bool, data: TensorDataset, epochs: int, batch: int, tmp: Path,
            device: torch.device = torch.device("cpu"), **model_kwargs) -> tuple[float, int]:  # fmt: skip
    model = build_model("tiny", seed=0, **model_kwargs).to(device)
    apply_mode(model, mode)
    config = TrainConfig(epochs=1, batch_size=batch, lr=1e-3)
    train_local(model, data, config)  # warm-up (allocations, first-call overheads)
    privacy = None
    if dp:
        # a timing: the ellipses have no patients, and a record costs one slice either way
        privacy = SitePrivacy.open(tmp / f"{mode}-{len(list(tmp.iterdir()))}", PrivacyConfig(unit="slice"),
                                   sample_rate=batch / len(data),
                                   planned_steps=epochs * steps_per_epoch(len(data), batch))  # fmt: skip
    Counting.drawn = 0
    start = time.perf_counter()
    train_local(model, data, TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3), privacy)
    seconds = time.perf_counter() - start
    return Counting.drawn / seconds, sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS / "model_speed.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = ellipses(args.images)
    data = Counting(*base.tensors)
    settings = [("fedmsa", {}), ("fedsam", {}),
                ("fedmsa", {"num_classes": 2, "prompt": "box"})]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, kwargs in settings:
            if kwargs:  # 2 classes: the second is the left half of each ellipse
                images, labels = base.tensors
                half = labels.clone()
                half[..., 32:] = 0
                data = Counting(images, torch.cat([labels, half], dim=1))
            for dp in (False, True):
                rate, params = measure(mode, dp, data, args.epochs, args.batch, Path(tmp), device, **kwargs)
                label = mode + (" (2 classes, box prompts)" if kwargs else "")
                rows.append((label, dp, rate, params))
                print(f"{label:<34} dp={dp!s:<5} {rate:7.1f} images/s  ({params:,} trainable)",
                      flush=True)  # fmt: skip
    plain = {label: rate for label, dp, rate, _ in rows if not dp}
    base_rate = plain["fedmsa"]
    head = _common.header(seeds=0, argv=_common.script_argv(__file__, argv), threads=args.threads,
                          device=str(device))
    lines = [
        "# Training speed of the tiny preset on CPU",
        "",
        *_common.header_markdown(head),
        "",
        f"Each row: `train_local` on {args.images} synthetic 64x64 slices, batch {args.batch}, "
        f"{args.epochs} timed epochs after a warm-up epoch; DP = Opacus DP-SGD (Poisson sampling, "
        "per-sample clipping, epsilon 8). All rows from this one run.",
        "",
        "| mode | DP | trainable parameters | images/s | vs fedmsa without DP | DP slowdown |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, dp, rate, params in rows:
        slowdown = f"{plain[label] / rate:.1f}x" if dp else ""
        lines.append(f"| {label} | {'yes' if dp else 'no'} | {params:,} | {rate:.1f} | "
                     f"{rate / base_rate:.2f} | {slowdown} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
