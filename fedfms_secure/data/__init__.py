"""Site datasets (MSD / nnU-Net layout, NIfTI or PNG) and a synthetic multi-site generator."""

from __future__ import annotations

from fedfms_secure.data.labels import LabelMap, num_classes_of, resolve_label_map
from fedfms_secure.data.layout import find_sites
from fedfms_secure.data.loader import SiteData, SliceDataset, load_site
from fedfms_secure.data.preprocess import Preprocessing
from fedfms_secure.data.synth import synth_federation

__all__ = ["LabelMap", "Preprocessing", "SiteData", "SliceDataset", "find_sites", "load_site", "num_classes_of",
           "resolve_label_map", "synth_federation"]
