"""Read a JSON object that must hold some keys (``federation.json``, a bundle's ``manifest.json``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedfms_secure.errors import KeyMaterialError


def read_json_object(file: Path, required: Iterable[str], *, missing: str, remedy: str) -> dict[str, Any]:
    """The JSON object in ``file``, which must hold every key of ``required``.

    KeyMaterialError with the message ``missing`` when the file does not exist, and one naming the
    file, what is wrong and ``remedy`` when it is unreadable, not a JSON object or lacks a key.
    """
    try:
        doc = json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise KeyMaterialError(missing) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KeyMaterialError(f"{file} is unreadable or not JSON ({exc}); {remedy}") from None
    if not isinstance(doc, dict):
        raise KeyMaterialError(f"{file} holds a JSON {type(doc).__name__}, not an object; {remedy}")
    absent = [key for key in required if key not in doc]
    if absent:
        raise KeyMaterialError(f"{file} is incomplete: it lacks {', '.join(absent)}; {remedy}")
    return doc
