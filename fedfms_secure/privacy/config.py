"""The (epsilon, delta) budget and DP-SGD clipping settings of a site."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fedfms_secure.errors import ConfigError
from fedfms_secure.privacy.units import DEFAULT_UNIT, check_unit

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


@dataclass(frozen=True)
class PrivacyConfig:
    """A site's privacy budget for the whole planned run and its clipping norm.

    ``accountant`` is Opacus' accounting mechanism: ``"rdp"`` (Renyi DP) or ``"prv"``
    (privacy random variables). ``unit`` is what one DP record is: ``"patient"`` (a case; the
    default) or ``"slice"`` (one 2-D slice; the guarantee then does not protect patients).
    """

    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    unit: str = DEFAULT_UNIT

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise ConfigError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(
                f"delta must be in (0, 1), got {self.delta}; use well below 1/(number of records)"
            )
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"unknown accountant {self.accountant!r}; choose one of: {', '.join(ACCOUNTANTS)}"
            )
        check_unit(self.unit)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            target_epsilon=float(data["target_epsilon"]),
            delta=float(data["delta"]),
            max_grad_norm=float(data["max_grad_norm"]),
            accountant=str(data["accountant"]),
            # state written before the unit existed was slice-level
            unit=str(data.get("unit", "slice")),
        )


__all__ = ["ACCOUNTANTS", "PrivacyConfig"]
