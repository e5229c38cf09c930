"""Site datasets (MSD / nnU-Net layout, NIfTI or PNG) and a synthetic multi-site generator.

The names below load on first use: importing ``fedfms_secure.data.labels`` (numpy only, as the
server's config checks do) does not pull in torch through the loader.

What the room holds: the layout and its patients (``layout``), label maps (``labels``), reading,
normalising, slicing and resizing (``preprocess``), the slice cache (``cache``), a site's dataset
and its patient-level train/validation split (``loader``, ``split``), the checks of ``data
inspect`` (``inspect``), the synthetic and real-anatomy generators (``synth``, ``anatomy``) and
the safe writing of generated site folders they share (``generated``). It may import torch, MONAI,
nibabel, ``errors`` and ``atomic``; nothing of the federation, the model or privacy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedfms_secure.data.labels import LabelMap, num_classes_of, resolve_label_map
    from fedfms_secure.data.layout import find_sites
    from fedfms_secure.data.loader import SiteData, SliceDataset, load_site
    from fedfms_secure.data.preprocess import Preprocessing
    from fedfms_secure.data.synth import synth_federation

_WHERE = {
    "LabelMap": "labels", "num_classes_of": "labels", "resolve_label_map": "labels",
    "find_sites": "layout",
    "SiteData": "loader", "SliceDataset": "loader", "load_site": "loader",
    "Preprocessing": "preprocess",
    "synth_federation": "synth",
}

__all__ = ["LabelMap", "Preprocessing", "SiteData", "SliceDataset", "find_sites", "load_site", "num_classes_of",
           "resolve_label_map", "synth_federation"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
