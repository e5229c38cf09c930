"""A multi-site federation cut from real MRI anatomy, written in the Medical Segmentation Decathlon layout.

The source is the MNI ICBM152 2009a symmetric template that nilearn ships inside its wheel: a T1
head volume at 1 mm and its grey- and white-matter probability maps (read from the installed
package's files, nothing is downloaded). Each *patient* is the template under its own smooth
random deformation (a small rotation, per-axis scaling and an elastic displacement field), cut as
an axial slab of ``slices`` slices whose position along the head varies from patient to patient.
The labels are the deformed tissue maps, thresholded: a voxel belongs to the listed class with the
highest probability when that probability is above one half.

Each site has its own *scanner* (stratified draws, so sites are guaranteed to differ): intensity
curve (gamma), in-plane resolution (blur), slice spacing (written in the affine), a smooth
multiplicative bias field, Rician noise, gain and offset. Gain and offset vanish in the loader's
percentile scaling, as they do for real scanners; the rest survives it. Everything derives from
``seed``: the same seed writes byte-identical files.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fedfms_secure.data.generated import write_case, write_generated_sites
from fedfms_secure.errors import ConfigError, DataError

TISSUES = ("wm", "gm")  # classes that can be asked for, with the template's probability map of each
TISSUE_NAMES = {"wm": "white matter", "gm": "grey matter"}
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_MARKER = "fedfms_secure.anatomy"  # in dataset.json: this folder may be overwritten
FOV_MM = 184.0  # in-plane field of view of every scan (the template's head fits in it)
SLAB_CENTRE = (98.0, 120.0, 92.0)  # template voxel the slabs are centred on (through the lateral ventricles)


@dataclass(frozen=True)
class AnatomyScanner:
    """How one site's scanner turns the template's T1 into intensities."""

    gamma: float  # intensity curve applied to the [0, 1] T1 image
    gain: float  # scanner units per template unit
    offset: float  # scanner units added
    noise: float  # std of the Rician noise, in template units
    bias: float  # amplitude of the smooth multiplicative bias field (log scale)
    blur: float  # in-plane Gaussian sigma in output voxels (lower effective resolution)
    slice_mm: float  # slice spacing in mm


def template_files() -> dict[str, Path]:
    """Paths of the T1 template and the tissue maps inside the installed nilearn package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the anatomy data set reads the MNI template shipped with nilearn, which is not "
                          "installed: pip install nilearn==0.14.1 (a dependency of fedfms-secure)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    files = {name: folder / _TEMPLATE.format(name) for name in ("t1", *TISSUES)}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"nilearn's template files are missing ({', '.join(missing)}): reinstall nilearn==0.14.1")
    return files


def parse_classes(classes: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"wm"``, ``"wm,gm"`` (or a sequence) -> the tissue names in label order (label k = k-th name)."""
    names = [c.strip().lower() for c in (classes.split(",") if isinstance(classes, str) else classes)]
    if not names or any(not n for n in names):
        raise ConfigError(f"--classes {classes!r}: give one or more of {', '.join(TISSUES)}, comma-separated")
    unknown = [n for n in names if n not in TISSUES]
    if unknown:
        raise ConfigError(f"--classes: unknown tissue(s) {', '.join(unknown)}; choose from {', '.join(TISSUES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--classes {classes!r} names a tissue twice")
    return tuple(names)


def anatomy_federation(
    out_dir: Path, *, sites: int = 3, cases: int = 3, seed: int = 0, size: int = 64, slices: int = 20,
    classes: str | tuple[str, ...] = "wm",
) -> list[Path]:
    """Write ``out_dir/site_1 .. site_K``, each an MSD-style site folder of ``cases`` volumes
    (``size`` x ``size`` x ``slices``), and return them.

    A site folder that a previous call wrote is replaced, and one it wrote beyond ``site_K`` is
    removed. If any ``site_k`` (k <= K) exists and was not written here, :class:`DataError` is
    raised before anything is written. Sites are built in a hidden staging folder and renamed into
    place, so an interrupted run leaves no half-written site behind.
    """
    tissues = parse_classes(classes)
    if sites < 1:
        raise ConfigError(f"--sites {sites}: must be at least 1")
    if cases < 1:
        raise ConfigError(f"--cases {cases}: must be at least 1 (2 or more to keep a validation case)")
    if not 16 <= size <= 512:
        raise ConfigError(f"--size {size}: the in-plane size must be between 16 and 512 pixels")
    if not 3 <= slices <= 128:
        raise ConfigError(f"--slices {slices}: the slab must have between 3 and 128 slices")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder; choose another output folder")
    targets = [out_dir / f"site_{k + 1}" for k in range(sites)]
    template = _load_template(tissues, FOV_MM / size)
    scanners = _scanners(np.random.default_rng([seed, 0]), sites)

    def write(k: int, site_dir: Path) -> None:
        _write_site(site_dir, template, tissues, scanners[k], cases, size, slices, np.random.default_rng([seed, k + 1]))

    return write_generated_sites(out_dir, targets, marker=_MARKER, what="`data anatomy`", staging=".fedfms-anatomy-staging",
                                 write=write)


def _load_template(tissues: tuple[str, ...], spacing_mm: float) -> dict[str, np.ndarray]:
    """The T1 in [0, 1] and the tissue probability maps, smoothed against aliasing at ``spacing_mm``."""
    from scipy.ndimage import gaussian_filter

    files = template_files()
    sigma = max(0.0, 0.4 * (spacing_mm - 1.0))  # the template is at 1 mm
    out = {}
    for name in ("t1", *tissues):
        volume = np.asarray(nib.load(files[name]).dataobj, dtype=np.float32) / 255.0
        out[name] = gaussian_filter(volume, sigma) if sigma > 0 else volume
    return out


def _scanners(rng: np.random.Generator, sites: int) -> list[AnatomyScanner]:
    def strata(lo: float, hi: float) -> np.ndarray:
        u = (rng.permutation(sites) + rng.uniform(0.15, 0.85, sites)) / sites
        return lo + (hi - lo) * u

    gamma, gain, offset = strata(0.6, 1.7), strata(200.0, 2000.0), strata(-100.0, 300.0)
    noise, bias, blur, slice_mm = strata(0.01, 0.05), strata(0.05, 0.3), strata(0.2, 1.2), strata(2.0, 3.5)
    return [AnatomyScanner(gamma=float(gamma[k]), gain=float(gain[k]), offset=float(offset[k]),
                           noise=float(noise[k]), bias=float(bias[k]), blur=float(blur[k]),
                           slice_mm=float(slice_mm[k])) for k in range(sites)]


def _write_site(site_dir: Path, template: dict[str, np.ndarray], tissues: tuple[str, ...], scanner: AnatomyScanner,
                cases: int, size: int, slices: int, rng: np.random.Generator) -> None:
    (site_dir / "imagesTr").mkdir(parents=True)
    (site_dir / "labelsTr").mkdir()
    spacing = (FOV_MM / size, FOV_MM / size, scanner.slice_mm)
    affine = np.diag([*spacing, 1.0])
    training = []
    for i in range(cases):
        t1, label = _patient(rng, template, tissues, size, slices, spacing)
        image = _scan(rng, t1, scanner)
        training.append(write_case(site_dir, i, image, label, affine))
    meta = {
        "name": f"anatomy {site_dir.name}",
        "description": "Axial slabs of the MNI ICBM152 2009a T1 template (shipped with nilearn) under random "
                       "elastic deformations, with a per-site scanner shift; labels from its tissue maps",
        "generator": _MARKER,
        "tensorImageSize": "3D",
        "modality": {"0": "T1w MRI"},
        "labels": {"0": "background", **{str(k + 1): TISSUE_NAMES[t] for k, t in enumerate(tissues)}},
        "numTraining": cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "scanner": asdict(scanner),
    }
    (site_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _patient(rng: np.random.Generator, template: dict[str, np.ndarray], tissues: tuple[str, ...], size: int,
             slices: int, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One patient: the template resampled through a random smooth deformation onto a
    ``size`` x ``size`` x ``slices`` grid. Returns the T1 in [0, 1] and the uint8 label."""
    from scipy.ndimage import map_coordinates, zoom

    shape = (size, size, slices)
    # output grid in mm, centred on the slab's centre
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, X, Y, Z)
    yaw, tilt = rng.uniform(-0.17, 0.17), rng.uniform(-0.07, 0.07, 2)  # radians: about 10 and 4 degrees
    rotation = _rotation(yaw, *tilt)
    scale = rng.uniform(0.9, 1.1, 3)  # head size and shape
    shift = np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-15, 15)])  # mm; z: where the slab lies
    points = np.einsum("ij,jxyz->ixyz", rotation * scale[None, :], grid) + shift[:, None, None, None]
    # elastic part: a smooth displacement of up to ~4 mm, from a coarse random field upsampled
    coarse = rng.standard_normal((3, 6, 6, 4)).astype(np.float32) * 2.0
    factors = [n / c for n, c in zip(shape, coarse.shape[1:])]
    points += np.stack([zoom(c, factors, order=3, mode="nearest") for c in coarse])
    coords = points + np.asarray(SLAB_CENTRE, dtype=np.float32)[:, None, None, None]  # template voxels are 1 mm
    sample = {name: map_coordinates(vol, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
              for name, vol in template.items()}
    probs = np.stack([sample[t] for t in tissues])
    best = probs.argmax(axis=0)
    label = np.where(probs.max(axis=0) > 0.5, best + 1, 0).astype(np.uint8)
    return np.clip(sample["t1"], 0.0, 1.0), label


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cz, sz, cy, sy, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return (rz @ ry @ rx).astype(np.float32)


def _scan(rng: np.random.Generator, t1: np.ndarray, s: AnatomyScanner) -> np.ndarray:
    """Apply a scanner: blur, bias field, intensity curve, Rician noise, gain and offset (float32)."""
    from scipy.ndimage import gaussian_filter, zoom

    img = gaussian_filter(t1, (s.blur, s.blur, 0.0)) if s.blur > 0 else t1
    coarse = rng.standard_normal((4, 4, 3)).astype(np.float32)
    field = zoom(coarse, [n / c for n, c in zip(t1.shape, coarse.shape)], order=3, mode="nearest")
    field = (field - field.mean()) / max(float(field.std()), 1e-6)
    img = np.clip(img * np.exp(s.bias * field), 0.0, None) ** s.gamma
    real = img + s.noise * rng.standard_normal(img.shape, dtype=np.float32)
    imag = s.noise * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt(real * real + imag * imag)  # magnitude images: Rician noise
    return (img * s.gain + s.offset).astype(np.float32)


__all__ = ["AnatomyScanner", "TISSUES", "anatomy_federation", "parse_classes", "template_files"]
