"""A synthetic multi-site federation written in the Medical Segmentation Decathlon layout.

Each volume holds a body (tissue with smooth texture, air around it) and one or two organs:
ellipsoids deformed by a smooth random field, short enough along z that the end slices are empty.
Each site has its own *scanner*: intensity curve (gamma), organ-to-tissue contrast, gain and
offset, noise level, bias field amplitude, voxel spacing (written in the affine) and the blur that
goes with it, and its own number of volumes (3 to 8 by default; ``volumes=(low, high)`` asks for
others, e.g. the demo's many small volumes: DP protects patients, so a site needs many of them),
so the federation is non-IID in both appearance and size. Gain and offset vanish in the loader's percentile scaling, as they do for
real scanners; the curve, the contrast, the noise, the bias field and the blur survive it.
Everything derives from ``seed``: the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedfms_secure.data.generated import write_case, write_generated_sites
from fedfms_secure.errors import ConfigError, DataError

MIN_VOLUMES, MAX_VOLUMES = 3, 8
_MARKER = "fedfms_secure.synth"  # in dataset.json: this folder may be overwritten


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner turns tissue into intensities."""

    gamma: float  # intensity curve applied to the [0, 1] tissue image
    contrast: float  # organ-to-tissue contrast, relative to the phantom's (sequence / protocol)
    gain: float  # scanner units per tissue unit
    offset: float  # scanner units added
    noise: float  # std of additive Gaussian noise, in tissue units
    bias: float  # amplitude of the smooth multiplicative bias field (log scale)
    blur: float  # in-plane Gaussian sigma in voxels (lower effective resolution)
    spacing: tuple[float, float, float]  # voxel size in mm, written in the affine


def synth_federation(
    out_dir: Path, *, sites: int = 3, seed: int = 0, shape: tuple[int, int, int] = (64, 64, 12),
    volumes: tuple[int, int] = (MIN_VOLUMES, MAX_VOLUMES),
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``out_dir/site_1 .. site_K`` (or ``out_dir/<name>`` for each of ``names``: then K is
    their number), each an MSD-style site folder, and return them.

    Each site gets a number of volumes (cases, i.e. patients) drawn from ``volumes`` (inclusive).

    A site folder that a previous call wrote is replaced, and one it wrote beyond ``site_K`` (by a
    run with more sites) is removed, so ``find_sites(out_dir)`` finds exactly these sites. If any
    ``site_k`` (k <= K) exists and was not written here, :class:`DataError` is raised before
    anything is written or removed. Sites are generated in a hidden staging folder and renamed
    into place, so an interrupted run leaves no half-written site behind.
    """
    if sites < 1:
        raise ConfigError(f"sites={sites} must be at least 1.")
    if len(shape) != 3 or min(shape[:2]) < 16 or shape[2] < 3:
        raise ConfigError(f"shape={shape} must be (X, Y, Z) with X, Y >= 16 and Z >= 3.")
    if len(volumes) != 2 or not 1 <= volumes[0] <= volumes[1]:
        raise ConfigError(f"volumes={volumes} must be (low, high) with 1 <= low <= high.")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder; choose another output folder.")
    if names is not None:
        sites = len(check_site_names(names))
    targets = [out_dir / (names[k] if names is not None else f"site_{k + 1}") for k in range(sites)]
    rng = np.random.default_rng(seed)
    profiles = _scanner_profiles(rng, sites, np.random.default_rng([seed, 0]))
    counts = _volume_counts(rng, sites, volumes)

    def write(k: int, site_dir: Path) -> None:
        (site_dir / "imagesTr").mkdir(parents=True)
        (site_dir / "labelsTr").mkdir()
        _write_site(site_dir, profiles[k], counts[k], tuple(shape), np.random.default_rng([seed, k + 1]))

    return write_generated_sites(out_dir, targets, marker=_MARKER, what="synth_federation", staging=".fedfms-synth-staging",
                                 write=write)


def check_site_names(names: Sequence[str]) -> list[str]:
    """Site folder names as given (``hosp_a,hosp_b``): non-empty, distinct, plain folder names."""
    names = list(names)
    bad = [n for n in names if not n or n.startswith(".") or "/" in n or "\\" in n or n.strip() != n]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"site names {','.join(names)!r} must be distinct plain folder names (e.g. "
                          "hosp_a,hosp_b; no '/', no leading '.', no spaces around them)")
    return names


def _scanner_profiles(rng: np.random.Generator, sites: int, contrast_rng: np.random.Generator) -> list[ScannerProfile]:
    # Stratified draws: each parameter's range is cut into `sites` strata, shuffled independently,
    # so sites are guaranteed to differ instead of differing only by chance.
    def strata(lo: float, hi: float, gen: np.random.Generator = rng) -> np.ndarray:
        u = (gen.permutation(sites) + gen.uniform(0.15, 0.85, sites)) / sites
        return lo + (hi - lo) * u

    gamma, gain, offset = strata(0.6, 1.6), strata(300.0, 1500.0), strata(-300.0, 400.0)
    noise, bias, res = strata(0.01, 0.06), strata(0.05, 0.35), strata(0.0, 1.0)
    slice_mm = strata(1.5, 5.0)
    # from its own generator: the other parameters and the site sizes stay those of earlier versions
    contrast = strata(0.7, 1.3, contrast_rng)
    return [
        ScannerProfile(
            gamma=float(gamma[k]),
            contrast=float(contrast[k]),
            gain=float(gain[k]),
            offset=float(offset[k]),
            noise=float(noise[k]),
            bias=float(bias[k]),
            blur=float(0.3 + 1.2 * res[k]),
            spacing=(float(0.6 + 0.9 * res[k]),) * 2 + (float(slice_mm[k]),),
        )
        for k in range(sites)
    ]


def _volume_counts(rng: np.random.Generator, sites: int, volumes: tuple[int, int]) -> list[int]:
    choices = np.arange(volumes[0], volumes[1] + 1)
    return [int(c) for c in rng.choice(choices, size=sites, replace=sites > len(choices))]


def _write_site(
    site_dir: Path,
    profile: ScannerProfile,
    n_volumes: int,
    shape: tuple[int, int, int],
    rng: np.random.Generator,
) -> None:
    affine = np.diag([*profile.spacing, 1.0])
    training = []
    for i in range(n_volumes):
        tissue, label = _phantom(rng, shape, profile.contrast)
        image = _scan(rng, tissue, profile)
        training.append(write_case(site_dir, i, image, label, affine))
    meta = {
        "name": f"synthetic {site_dir.name}",
        "description": "Synthetic organ phantoms with a per-site scanner shift",
        "generator": _MARKER,
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "organ"},
        "numTraining": n_volumes,
        "numTest": 0,
        "training": training,
        "test": [],
        "scanner": asdict(profile),
    }
    (site_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _phantom(
    rng: np.random.Generator, shape: tuple[int, int, int], contrast: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue image in [0, 1] and a uint8 organ label for one volume (``contrast`` scales the
    organ's step above the surrounding tissue)."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    nx, ny, nz = shape
    body_r = rng.uniform(0.36, 0.46, 2) * (nx, ny)
    body = ((x - nx / 2) / body_r[0]) ** 2 + ((y - ny / 2) / body_r[1]) ** 2 < 1.0
    warp = np.clip(_smooth_noise(rng, shape, sigma=(nx / 8, ny / 8, nz / 4)), -1.5, 1.5)
    organ = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 3)):
        radii = np.array([*rng.uniform(0.1, 0.2, 2) * (nx, ny), rng.uniform(0.12, 0.25) * nz])
        centre = np.array([*rng.uniform(0.35, 0.65, 2) * (nx, ny), rng.uniform(0.4, 0.6) * nz])
        angle = rng.uniform(0, np.pi)
        u = np.cos(angle) * (x - centre[0]) + np.sin(angle) * (y - centre[1])
        v = -np.sin(angle) * (x - centre[0]) + np.cos(angle) * (y - centre[1])
        dist = (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
        organ |= dist + 0.35 * warp < 1.0
    texture = _smooth_noise(rng, shape, sigma=(1.5, 1.5, 0.7))
    tissue = body * (0.4 + 0.06 * texture) + organ * contrast * (0.35 + 0.04 * np.roll(texture, 3, axis=0))
    return tissue.astype(np.float32), organ.astype(np.uint8)


def _scan(rng: np.random.Generator, tissue: np.ndarray, p: ScannerProfile) -> np.ndarray:
    """Apply a scanner profile: blur, bias field, gamma, noise, gain and offset (float32)."""
    img = _gaussian_blur(tissue, (p.blur, p.blur, 0.3 * p.blur))
    nx, ny, nz = tissue.shape
    bias = np.exp(p.bias * _smooth_noise(rng, tissue.shape, sigma=(nx / 3, ny / 3, nz)))
    img = np.clip(img * bias, 0.0, None) ** p.gamma
    img = img + p.noise * rng.standard_normal(tissue.shape, dtype=np.float32)
    return (img * p.gain + p.offset).astype(np.float32)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]
) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to zero mean and unit standard deviation."""
    field = _gaussian_blur(rng.standard_normal(shape, dtype=np.float32), sigma)
    field -= field.mean()  # else the unfiltered DC term dominates wide kernels
    return field / max(float(field.std()), 1e-6)


def _gaussian_blur(volume: np.ndarray, sigma: tuple[float, ...]) -> np.ndarray:
    """Gaussian blur by FFT (periodic borders: fine for noise and for air-framed phantoms)."""
    spectrum = np.fft.rfftn(volume)
    freqs = [np.fft.fftfreq(n) for n in volume.shape[:-1]] + [np.fft.rfftfreq(volume.shape[-1])]
    grids = np.meshgrid(*freqs, indexing="ij")
    exponent = sum((2 * np.pi * f * s) ** 2 for f, s in zip(grids, sigma)) / 2
    blurred = np.fft.irfftn(spectrum * np.exp(-exponent), s=volume.shape, axes=range(volume.ndim))
    return blurred.astype(np.float32)


def ellipses(n: int, size: int = 64, seed: int = 0) -> TensorDataset:
    """A tiny, easy 2-D segmentation task for speed measurements and tests: bright noisy ellipses on
    a darker noisy background. ``n`` items ``(image [1,S,S] in [0,1], label [1,S,S] in {0,1})``, as
    the data layer gives them."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx = ((torch.rand(2, generator=gen) * 0.5 + 0.25) * size).tolist()
        ry, rx = ((torch.rand(2, generator=gen) * 0.15 + 0.12) * size).tolist()
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float()
        noise = 0.1 * torch.randn(size, size, generator=gen)
        images.append((0.25 + noise + 0.5 * mask).clamp(0, 1))
        labels.append(mask)
    return TensorDataset(torch.stack(images)[:, None], torch.stack(labels)[:, None])
