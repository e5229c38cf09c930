"""Writing generated site folders (``data synth``, ``data anatomy``) without losing anything.

A generator marks each site it writes (``"generator"`` in its ``dataset.json``). Only folders with
that generator's mark are ever replaced: any other existing target stops the run before anything is
written. Sites are written in a hidden staging folder and renamed into place once all succeeded;
a failure removes the staging folder and leaves the previous sites as they were. Marked folders
``site_k`` beyond the new count, left by an earlier larger run, are removed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from fedfms_secure.errors import DataError

_SITE_NAME = re.compile(r"site_(?P<k>[1-9][0-9]*)")


def write_generated_sites(out_dir: Path, targets: Sequence[Path], *, marker: str, what: str, staging: str,
                          write: Callable[[int, Path], None]) -> list[Path]:
    """Calls ``write(k, folder)`` for each target (``folder`` in staging), then swaps them in.

    ``marker``: the generator's mark in ``dataset.json`` (``write`` must put it there); ``what``:
    the generator's name for the message that refuses a foreign folder; ``staging``: the hidden
    folder (in ``out_dir``) the sites are written to first.
    """
    foreign = [t for t in targets if (t.exists() or t.is_symlink()) and not is_generated(t, marker)]
    if foreign:
        raise DataError(f"{', '.join(map(str, foreign))} already exist(s) and was not written by {what}; "
                        "choose an empty output folder or delete it. Nothing was written.")
    folder = out_dir / staging
    _remove(folder)  # left by an interrupted run
    folder.mkdir(parents=True)
    try:
        for k, target in enumerate(targets):
            write(k, folder / target.name)
    except BaseException:
        _remove(folder)
        raise
    for target in targets:
        if target.exists():
            shutil.rmtree(target)
        (folder / target.name).rename(target)
    for stale in sorted(p for p in out_dir.iterdir()
                        if (m := _SITE_NAME.fullmatch(p.name)) and int(m["k"]) > len(targets)
                        and is_generated(p, marker)):
        shutil.rmtree(stale)
    folder.rmdir()
    return list(targets)


def write_case(site_dir: Path, index: int, image: np.ndarray, label: np.ndarray,
               affine: np.ndarray) -> dict[str, str]:
    """Writes case ``index`` (``case_XXX.nii.gz`` in imagesTr/ and labelsTr/); returns its
    ``dataset.json`` training entry."""
    name = f"case_{index:03d}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), site_dir / "imagesTr" / name)
    nib.save(nib.Nifti1Image(label, affine), site_dir / "labelsTr" / name)
    return {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}


def is_generated(site_dir: Path, marker: str) -> bool:
    """Whether ``site_dir`` is a real folder whose dataset.json carries ``marker``."""
    if site_dir.is_symlink() or not site_dir.is_dir():
        return False
    try:
        return json.loads((site_dir / "dataset.json").read_text()).get("generator") == marker
    except (OSError, ValueError, AttributeError):
        return False


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
