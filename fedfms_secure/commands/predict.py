"""``fedfms-secure predict``: segment new scans with a trained model file.

``predict --model FILE --input PATH --out DIR`` writes one mask per input into ``DIR`` (same file
name, the input's own grid; see :mod:`fedfms_secure.train.predict`) and prints what it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# kept light: torch and the model are imported inside the handler

DESCRIPTION = """\
Segment new scans with a model file (a site's STATE/final_model.pt, or OUT/*_model.pt of
`train central|local`). Each input is sliced and normalised exactly as in training, the model's
logits are resized back to each slice's own size, and a pixel takes the most probable class whose
probability exceeds 0.5 (else background), written as that class's label value. NIfTI in: NIfTI
out with the same shape, voxel grid and affine; PNG in: PNG out of the same size.

Prompts: a prompt-free model (the default) needs none. A model trained with box prompts saw boxes
drawn from the labels; a new scan has no label, so every class is prompted with the whole slice
(training's box for an absent class), and its masks are not the ones `evaluate` scores.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``predict`` to an argparse ``subparsers``."""
    p = subparsers.add_parser("predict", help="segment new scans (NIfTI or PNG) with a trained model file",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="STATE/final_model.pt of a site, or OUT/*_model.pt")
    p.add_argument("--input", type=Path, required=True,
                   help="a NIfTI (.nii, .nii.gz) or PNG file, a folder of them, or a site folder (its imagesTs/, "
                        "else imagesTr/)")
    p.add_argument("--out", type=Path, required=True, help="folder for the masks (same file names as the inputs)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default 16)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write per-class probabilities to OUT/probabilities/ (NIfTI with a class axis; "
                        ".npy [K, H, W] for PNG)")
    p.add_argument("--overwrite", action="store_true", help="replace masks that exist already in --out")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    p.set_defaults(handler=cmd_predict)
    return p


def cmd_predict(args: argparse.Namespace) -> int:
    """Handler of ``predict``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedfms_secure.train.model_file import load_model
    from fedfms_secure.train.predict import PredictOptions, predict_path, resolve_device

    device = resolve_device(args.device)  # a bad --device fails before the model loads
    loaded = load_model(args.model)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[Path, Any] = {}

        def progress(path: Path, done: int, total: int) -> None:
            if path not in tasks:
                tasks[path] = bar.add_task(f"{path.name} (slices)", total=total)
            bar.update(tasks[path], completed=done)

        options = PredictOptions(device=str(device), batch_size=args.batch_size, probabilities=args.probabilities,
                                 overwrite=args.overwrite, progress=progress)
        results = predict_path(loaded, args.input, args.out, options)
    meta = loaded.meta
    doc = {
        "model": str(args.model),
        "device": str(device),
        "classes": {name: value for name, value in zip(meta.class_names, meta.label_values, strict=True)},
        "masks": [{"input": str(r.source), "mask": str(r.mask), "shape": list(r.shape), "slices": r.slices,
                   "voxels": {str(v): c for v, c in r.voxels.items()},
                   "probabilities": None if r.probabilities is None else str(r.probabilities)} for r in results],
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    classes = ", ".join(f"{name} = {value}" for name, value in doc["classes"].items())
    print(f"{len(results)} mask(s) in {args.out} (labels: {classes}; device {device})", file=sys.stdout)
    for r in results:
        counts = ", ".join(f"{c} voxels of {v}" for v, c in r.voxels.items())
        print(f"  {r.mask.name}: {'x'.join(map(str, r.shape))}, {counts}")
    return 0


__all__ = ["cmd_predict", "register"]
