"""Data loading speed: preprocessed slices per second, cold (read and resample every file, fill the
slice cache) and warm (every slice from the cache), in one run so the ratio is comparable.

Data: the demo's synthetic federation (``synth_federation(sites=3, seed=0, shape=(64, 64, 40))``),
and a CT-sized set (``--ct``: 3 volumes of 256 x 256 x 64 int16, written here with nibabel).
Each case is loaded with :func:`~fedfms_secure.data.load_site` as a site loads it (FedFMS's one
empty slice in five, 0.5/99.5 percentiles, the model's input size): *no cache* reads the files,
*cold* reads them and writes the cache, *warm* reads only the cache. The best of ``--repeats``
runs is kept for each (the operating system's file cache is warm after the first read in every
row, so cold is the cost of decoding and preprocessing, not of the disk). Torch runs one thread
(``--threads``), as the demo's site processes do (``OMP_NUM_THREADS=1``): on a shared, loaded
machine two threads spend most of a small tensor operation waiting for each other.

    .venv/bin/python -m benchmarks.data_loading     # writes benchmarks/results/data_loading.md
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks import _common
from fedfms_secure.data import find_sites, load_site, synth_federation


def write_ct_site(root: Path, volumes: int = 3, shape: tuple[int, int, int] = (256, 256, 64)) -> Path:
    """A site of CT-sized int16 volumes (Hounsfield units) with an organ label."""
    rng = np.random.default_rng(0)
    site = root / "ct_site"
    (site / "imagesTr").mkdir(parents=True)
    (site / "labelsTr").mkdir()
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    for i in range(volumes):
        organ = (x / 0.4) ** 2 + (y / 0.3) ** 2 + (z / 0.5) ** 2 < 1
        hu = np.where(x**2 + y**2 < 0.8, 40.0, -1000.0) + 60.0 * organ + rng.normal(0, 20, shape)
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), site / "imagesTr" / f"ct_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(organ.astype(np.uint8), affine), site / "labelsTr" / f"ct_{i:03d}.nii.gz")
    return site


def measure(sites: list[Path], image_size: int, cache: Path | None) -> tuple[int, float]:
    """Slices loaded from every site and the seconds it took."""
    start = time.perf_counter()
    slices = 0
    for site in sites:
        data = load_site(site, image_size=image_size, cache_dir=cache)
        slices += len(data.train) + len(data.val)
    return slices, time.perf_counter() - start


def run(label: str, sites: list[Path], image_size: int, repeats: int, tmp: Path) -> dict:
    best = {"no cache": float("inf"), "cold": float("inf"), "warm": float("inf")}
    slices = 0
    measure(sites, image_size, None)  # imports, readers and the file cache: not part of any row
    for r in range(repeats):
        slices, plain = measure(sites, image_size, None)
        best["no cache"] = min(best["no cache"], plain)
        cache = tmp / f"cache-{label}-{image_size}-{r}"
        shutil.rmtree(cache, ignore_errors=True)
        n, cold = measure(sites, image_size, cache)
        _, warm = measure(sites, image_size, cache)
        best["cold"], best["warm"] = min(best["cold"], cold), min(best["warm"], warm)
        assert n == slices
    size = sum(p.stat().st_size for p in tmp.glob(f"cache-{label}-{image_size}-0/**/*.pt"))
    return {"data": label, "image_size": image_size, "slices": slices, "cache_bytes": size,
            **{f"{k} slices/s": slices / v for k, v in best.items()}, "warm/cold": best["cold"] / best["warm"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-sizes", default="64,256", help="model input sizes (default 64,256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ct", action="store_true", help="skip the CT-sized volumes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a demo site)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS / "data_loading.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    head = _common.header(seeds=0, threads=args.threads)
    sizes = [int(s) for s in args.image_sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedfms-bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        sets = [("synthetic federation, 3 sites of 64 x 64 x 40",
                 synth_federation(tmp / "synth", sites=3, seed=0, shape=(64, 64, 40)))]
        if not args.no_ct:
            sets.append(("CT-sized, 3 volumes of 256 x 256 x 64 int16", find_sites(write_ct_site(tmp / "ct"))))
        progress = _common.Progress(len(sets) * len(sizes))
        for label, sites in sets:
            for size in sizes:
                progress.start(f"{label} at {size} px")
                rows.append(run(label, sites, size, args.repeats, tmp))
                progress.finish(f"warm {rows[-1]['warm slices/s']:.0f} slices/s, cold {rows[-1]['cold slices/s']:.0f}")
    lines = ["# Data loading: preprocessed slices per second, cold and warm", "", *_common.header_markdown(head), "",
             "Cold: read every NIfTI file through MONAI, clip, slice, resize and write the slice cache; warm: "
             "every case from the cache (file identity checked, SHA-256 of the tensors verified); no cache: cold "
             f"without writing. Best of {args.repeats} runs each, all rows from this one run.", "",
             "| data | image size | slices | no cache (slices/s) | cold (slices/s) | warm (slices/s) | warm / cold | cache size |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['data']} | {row['image_size']} | {row['slices']} | {row['no cache slices/s']:.0f} | "
                     f"{row['cold slices/s']:.0f} | {row['warm slices/s']:.0f} | {row['warm/cold']:.1f}x | "
                     f"{row['cache_bytes'] / 1e6:.2f} MB |")
    lines += ["", "For scale: `benchmarks/results/model_speed.md` trains the tiny preset at 64 px at about 500 "
              "images/s without DP and 200 with DP on this kind of machine, and slices stay in memory across "
              "epochs and rounds, so loading is paid once per process."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
