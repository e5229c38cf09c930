"""Site folders in the Medical Segmentation Decathlon / nnU-Net layout.

A *site folder* holds one dataset::

    site_1/
        dataset.json          optional here (MSD / nnU-Net metadata)
        imagesTr/case_000.nii.gz    (or .nii, or .png)
        labelsTr/case_000.nii.gz    same name as the image

nnU-Net v2 channel suffixes are understood: ``imagesTr/case_000_0000.nii.gz`` pairs with
``labelsTr/case_000.nii.gz``; further channels (``_0001`` ...) are ignored, since SAM takes one
intensity channel. Hidden files (``.DS_Store``, the ``._*`` AppleDouble files shipped inside the
MSD tarballs) are skipped.

**Patients.** Differential privacy protects patients, so every case belongs to one patient. A
3-D volume is its own patient. 2-D pictures (PNG) of one patient are grouped by, in order:
a regular expression on the file name (``patient_pattern``: the group named ``patient``, else the
first group, else the whole match), or a ``"patient"`` key in a ``dataset.json`` training entry
(``{"image": "./imagesTr/p7_s3.png", "label": "./labelsTr/p7_s3.png", "patient": "p7"}``);
without either, each file is its own patient (and the log says so).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from fedfms_secure.errors import DataError

IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
SUFFIXES = (".nii.gz", ".nii", ".png")
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_EXPECTED = (
    "expected either a site folder containing imagesTr/ and labelsTr/ (Medical Segmentation "
    "Decathlon / nnU-Net layout), or a folder whose sub-folders are such site folders"
)

log = logging.getLogger("fedfms_secure.data")


@dataclass(frozen=True)
class CasePair:
    """One training case of a site: an image file and its label file (None if it has none)."""

    name: str
    image: Path
    label: Path | None


def patient_ids(site_dir: Path, cases: list[CasePair], pattern: str | None = None) -> dict[str, str]:
    """The patient of every case name (see the module docstring for the rules).

    Raises :class:`DataError` if ``pattern`` is not a valid regular expression or does not match
    a case's file name, naming the file and what to write instead.
    """
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise DataError(f"patient pattern {pattern!r} is not a regular expression ({exc}); e.g. "
                            r"'^(?P<patient>[^_]+)_' for files named PATIENT_SLICE.png") from None
        out = {}
        for case in cases:
            match = regex.search(case.name)
            if match is None:
                raise DataError(
                    f"patient pattern {pattern!r} does not match the file name {case.image.name!r} (case "
                    f"{case.name!r}); write a pattern that matches every file of {site_dir / IMAGES_DIR}"
                )
            groups = match.groupdict()
            out[case.name] = groups.get("patient") or (match.group(1) if regex.groups else match.group(0))
        return out
    listed = _patients_from_dataset_json(Path(site_dir))
    out = {case.name: listed.get(case.image.name, case.name) for case in cases}
    if not listed and any(case.image.name.lower().endswith(".png") for case in cases):
        log.info("site %s: each 2-D file is its own patient (no patient pattern, no 'patient' in dataset.json); "
                 "give --patient-pattern to group a patient's files", site_dir)
    return out


def _patients_from_dataset_json(site_dir: Path) -> dict[str, str]:
    """Image file name -> patient, from the ``"patient"`` keys of ``dataset.json`` (may be empty)."""
    path = site_dir / "dataset.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    entries = doc.get("training") if isinstance(doc, dict) else None
    out: dict[str, str] = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("patient"), (str, int)) and isinstance(entry.get("image"), str):
            out[Path(entry["image"]).name] = str(entry["patient"])
    return out


def is_site_dir(path: Path) -> bool:
    """True if ``path`` is a folder with an ``imagesTr/`` sub-folder."""
    return (Path(path) / IMAGES_DIR).is_dir()


def find_sites(data_dir: Path) -> list[Path]:
    """Return the site folders under ``data_dir``.

    ``data_dir`` is either a site folder itself (it has ``imagesTr/``), giving ``[data_dir]``, or a
    folder of site folders, giving them sorted by name. Raises :class:`DataError` if the folder is
    missing or holds no site.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist or is not a folder; {_EXPECTED}.")
    if is_site_dir(data_dir):
        return [data_dir]
    sites = sorted(p for p in data_dir.iterdir() if p.is_dir() and is_site_dir(p))
    if not sites:
        raise DataError(
            f"no site found in {data_dir}: {_EXPECTED}. "
            "Run `fedfms-secure demo` or synth_federation() to create an example."
        )
    return sites


def list_cases(site_dir: Path) -> list[CasePair]:
    """Pair every image in ``imagesTr/`` with the label of the same name in ``labelsTr/``.

    Returns the cases sorted by name; an image without a label gets ``label=None`` (the caller
    decides whether that is fatal). Raises :class:`DataError` if either folder is missing,
    ``imagesTr/`` holds no image, or two files would be the same case (``a.nii.gz`` and ``a.png``;
    ``b.nii.gz`` and ``b_0000.nii.gz``; labels ``a.nii`` and ``a.nii.gz``).
    """
    site_dir = Path(site_dir)
    images_dir, labels_dir = site_dir / IMAGES_DIR, site_dir / LABELS_DIR
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(
                f"site {site_dir} has no {folder.name}/ folder; {_EXPECTED} "
                f"(images in {IMAGES_DIR}/, labels with the same file names in {LABELS_DIR}/)."
            )
    labels: dict[str, Path] = {}
    for label in _image_files(labels_dir):
        _refuse_duplicate(labels.get(image_stem(label)), label, image_stem(label))
        labels[image_stem(label)] = label
    cases: dict[str, CasePair] = {}
    for image in _image_files(images_dir):
        stem = image_stem(image)
        if stem in labels:
            name = stem
        elif (m := _NNUNET_CHANNEL.match(stem)) and m["case"] in labels:
            if m["channel"] != "0000":
                log.debug("ignoring extra nnU-Net channel %s (SAM uses channel 0000)", image)
                continue
            name = m["case"]
        else:
            name = stem
        _refuse_duplicate(cases[name].image if name in cases else None, image, name)
        cases[name] = CasePair(name=name, image=image, label=labels.get(name))
    if not cases:
        raise DataError(
            f"{images_dir} holds no image ({', '.join(SUFFIXES)}); put the training images there "
            f"and their labels under the same names in {labels_dir}."
        )
    return [cases[name] for name in sorted(cases)]


def expected_label(image: Path) -> Path:
    """Where the label of ``image`` belongs: ``labelsTr/`` beside its ``imagesTr/``, same name
    without the nnU-Net channel suffix (``imagesTr/b_0000.nii.gz`` -> ``labelsTr/b.nii.gz``)."""
    stem = image_stem(image)
    suffix = image.name[len(stem) :]
    match = _NNUNET_CHANNEL.match(stem)
    case = match["case"] if match else stem
    return image.parent.parent / LABELS_DIR / f"{case}{suffix}"


def _refuse_duplicate(first: Path | None, second: Path, name: str) -> None:
    if first is not None:
        raise DataError(
            f"{first} and {second} are both case {name!r}; keep one file per case in {second.parent} "
            "(remove or rename the other)."
        )


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SUFFIXES)
    )


def image_stem(path: Path) -> str:
    """The file name without its image suffix (``case_01.nii.gz`` -> ``case_01``)."""
    lower = path.name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem
