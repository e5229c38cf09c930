"""fedfms-secure: federated fine-tuning of Segment Anything with DP-SGD, CKKS and mutual TLS."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedfms_secure.train.model_file import LoadedModel


def load_model(path: Path | str, *, device: Any = "cpu") -> LoadedModel:
    """A trained model file (``STATE/final_model.pt`` of a site, ``OUT/*_model.pt`` of ``train``)
    ready for inference: ``loaded.model`` (a ``SamSegmenter`` in eval mode on ``device``) and
    ``loaded.meta`` (preset, class map, label values, preprocessing, ...; see
    :mod:`fedfms_secure.train.model_file`). Raises ``ModelError`` naming what is wrong with the file."""
    from fedfms_secure.train.model_file import load_model as _load

    return _load(path, device=device)


__all__ = ["__version__", "load_model"]
