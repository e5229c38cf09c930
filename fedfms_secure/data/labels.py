"""Label mapping: which values of a site's label maps become which of the model's classes.

The model predicts ``K`` foreground classes (1 to 4: one SAM mask token each, the classes that
box prompts address). A label file may hold more values (e.g. MSD Task03_Liver: 1 liver, 2 tumour)
and a site decides how they map onto the model's classes. A *label spec* is one of:

* nothing (``None`` or ``""``): every non-zero value is the one foreground class (the default);
* a comma list of values or names, ``"1,2"`` or ``"liver,tumour"``: those values merge into the
  one foreground class, every other value is background;
* a JSON object ``{"1": 1, "2": 1, "3": 2}`` (keys: label values or names, values: model classes
  0..4; 0 is background), inline or as the path of a ``.json`` file; values it does not list are
  background. The classes it uses must be 1..K without a gap.

Names are looked up in the site's ``dataset.json``: MSD writes ``"labels": {"0": "background",
"1": "liver"}``, nnU-Net v2 writes ``"labels": {"background": 0, "liver": 1}``; both are read.
Class names for reports come from the same file (``"liver+tumour"`` for merged values).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedfms_secure.errors import ConfigError, DataError

MAX_CLASSES = 4  # SAM's mask decoder has four mask tokens: one per class
DATASET_JSON = "dataset.json"

log = logging.getLogger("fedfms_secure.data")

_SPEC_HELP = (
    'give nothing (every non-zero value is foreground), a comma list such as "1,2" (those values '
    'are foreground), or a JSON object such as \'{"1": 1, "2": 1, "3": 2}\' mapping label values '
    f"(or names from dataset.json) to classes 1..{MAX_CLASSES}"
)


@dataclass(frozen=True)
class LabelMap:
    """A resolved label mapping: ``pairs`` of (label value, class), or ``None`` for "non-zero is
    class 1"; ``names`` holds the name of each class 1..K."""

    pairs: tuple[tuple[int, int], ...] | None
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def apply(self, label: np.ndarray) -> np.ndarray:
        """Class indices (uint8, 0 = background) of a label array; values are rounded first."""
        values = np.rint(np.nan_to_num(np.asarray(label, dtype=np.float64))).astype(np.int64)
        out = np.zeros(values.shape, dtype=np.uint8)
        if self.pairs is None:
            out[values > 0] = 1
            return out
        for value, cls in self.pairs:
            if cls:
                out[values == value] = cls
        return out

    def describe(self) -> dict[str, Any]:
        """JSON form: ``{"classes": {"1": name, ...}, "map": {"value": class, ...} | "non-zero"}``."""
        return {
            "classes": {str(k + 1): name for k, name in enumerate(self.names)},
            "map": "non-zero" if self.pairs is None else {str(v): c for v, c in self.pairs},
        }


def num_classes_of(spec: str | Mapping[str, Any] | None) -> int:
    """Number of model classes a label spec asks for, without reading any site (ConfigError if
    the spec is malformed)."""
    entries = _parse(spec)
    return 1 if entries is None else max(entries.values())


def resolve_label_map(spec: str | Mapping[str, Any] | LabelMap | None, site_dir: Path | None = None) -> LabelMap:
    """The :class:`LabelMap` of ``spec`` for one site: names resolved through its ``dataset.json``.

    Raises :class:`ConfigError` for a malformed spec and :class:`DataError` for a name the site's
    ``dataset.json`` does not define (or a name given where the site has no ``dataset.json``).
    """
    if isinstance(spec, LabelMap):
        return spec
    entries = _parse(spec)
    known = read_label_names(site_dir) if site_dir is not None else {}
    if entries is None:
        foreground = [name for value, name in sorted(known.items()) if value != 0]
        name = foreground[0] if len(foreground) == 1 else "foreground"
        return LabelMap(pairs=None, names=(name,))
    by_name = {name.lower(): value for value, name in known.items()}
    pairs: dict[int, int] = {}
    for key, cls in entries.items():
        value = _value_of(key, by_name, site_dir)
        if value in pairs and pairs[value] != cls:
            raise ConfigError(f"label value {value} is mapped twice (to classes {pairs[value]} and {cls}); "
                              "map each value once")
        pairs[value] = cls
    k = max(pairs.values())
    names = []
    for cls in range(1, k + 1):
        members = sorted(v for v, c in pairs.items() if c == cls)
        names.append("+".join(known.get(v, f"label {v}") for v in members))
    return LabelMap(pairs=tuple(sorted(pairs.items())), names=tuple(names))


def read_label_names(site_dir: Path | None) -> dict[int, str]:
    """``{value: name}`` from ``SITE/dataset.json`` (MSD or nnU-Net v2 form); ``{}`` if there is
    no such file. A ``dataset.json`` that is not valid JSON raises :class:`DataError`."""
    if site_dir is None:
        return {}
    path = Path(site_dir) / DATASET_JSON
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); fix it or remove it (it is optional).") from exc
    labels = doc.get("labels") if isinstance(doc, dict) else None
    if not isinstance(labels, dict):
        return {}
    names: dict[int, str] = {}
    for key, value in labels.items():
        if _is_int(key) and isinstance(value, str):  # MSD: {"1": "liver"}
            names[int(key)] = value
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: {"liver": 1}
            names[value] = str(key)
        # nnU-Net v2 region labels ({"tumour": [1, 2]}) name no single value: left out
    return names


def _value_of(key: str, by_name: dict[str, int], site_dir: Path | None) -> int:
    if _is_int(key):
        value = int(key)
        if value < 0:
            raise ConfigError(f"label value {value} is negative; label maps hold values 0, 1, 2, ...")
        return value
    if key.lower() in by_name:
        return by_name[key.lower()]
    where = f"{Path(site_dir) / DATASET_JSON}" if site_dir is not None else "the site's dataset.json"
    known = ", ".join(f"{name!r} ({value})" for name, value in sorted(by_name.items(), key=lambda x: x[1]))
    raise DataError(
        f"label name {key!r} is not defined in {where}"
        + (f" (it defines {known})" if known else " (the site has no label names)")
        + "; use the label value instead, or a name that file defines."
    )


def _parse(spec: str | Mapping[str, Any] | None) -> dict[str, int] | None:
    """``{value-or-name: class}``, or None for the default (non-zero is foreground)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        raw: Any = dict(spec)
    else:
        text = str(spec).strip()
        if not text:
            return None
        if text.startswith("{"):
            try:
                raw = json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"label map {text!r} is not valid JSON ({exc}); {_SPEC_HELP}.") from exc
        elif text.lower().endswith(".json") and "," not in text:
            path = Path(text).expanduser()
            try:
                raw = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"label map file {path} does not exist; {_SPEC_HELP}.") from None
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(f"label map file {path} is not a readable JSON object ({exc}).") from exc
        else:
            keys = [part.strip() for part in text.split(",")]
            if any(not k for k in keys):
                raise ConfigError(f"label list {text!r} has an empty entry; {_SPEC_HELP}.")
            raw = {k: 1 for k in keys}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"label map {spec!r} must be a non-empty JSON object; {_SPEC_HELP}.")
    entries: dict[str, int] = {}
    for key, cls in raw.items():
        if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls <= MAX_CLASSES:
            raise ConfigError(
                f"label map entry {key!r}: {cls!r} is not a class; classes are integers 0..{MAX_CLASSES} "
                "(0 background, 1..K the model's classes)"
            )
        entries[str(key).strip()] = cls
    used = sorted({c for c in entries.values() if c})
    if not used:
        raise ConfigError(f"label map {spec!r} maps every value to background (0); map at least one to class 1.")
    if used != list(range(1, used[-1] + 1)):
        missing = sorted(set(range(1, used[-1] + 1)) - set(used))
        raise ConfigError(
            f"label map {spec!r} uses classes {used} but not {missing}: the classes must be 1..K without a gap "
            "(each is one of the model's outputs)"
        )
    return entries


def _is_int(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    stripped = text.strip()
    return stripped.lstrip("-").isdigit()


__all__ = ["LabelMap", "MAX_CLASSES", "num_classes_of", "read_label_names", "resolve_label_map"]
