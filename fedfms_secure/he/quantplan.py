"""The quantisation a federation's plan allows: bound and step of the packed CKKS updates.

``packing.py`` (section 3 of its docstring) derives the figures; this module turns a public plan
(Adam's learning rate, local steps per round, sites, rounds, DP or not) into ``CkksParams``::

    bound     = lr * local_steps                    (Adam moves a coordinate by at most ~lr a step)
    noise_std = lr * sqrt(local_steps) / sites      (DP noise of one site's weighted update, per coordinate)
    step      <= 2 * error_ratio * noise_std        (quantisation error std <= step / 2)
    step      <= 2 * relative_error * bound         (without DP)
    quant_bits = ceil(log2(bound / step))

``plan_params`` then packs as many lanes per coefficient as the carry headroom of ``sites x rounds``
summands leaves in one 60-bit prime (``choose_params``), or raises a ConfigError naming what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from fedfms_secure.errors import ConfigError

#: quantisation error std <= this fraction of the DP noise std of the weighted update (per coordinate)
DEFAULT_ERROR_RATIO = 0.01
#: without DP: quantisation error std <= this fraction of the bound
DEFAULT_RELATIVE_ERROR = 1e-3
#: |one Adam step| / lr per coordinate that the bound allows for (see packing.py, section 3)
ADAM_STEP_BOUND = 1.0
#: finest quantisation a plan may ask for (step = bound / 2**bits)
MAX_QUANT_BITS = 30


@dataclass(frozen=True)
class UpdatePlan:
    """The public figures a federation plans with; everything a site's weighted update is sized from.

    ``lr``: Adam's learning rate; ``local_steps``: optimizer steps of the busiest site in one round
    (epochs x steps per epoch), which sets the bound; ``min_local_steps``: those of the least busy
    site (default ``local_steps``), which set the noise; ``sites`` and ``rounds``: K and R of one
    CKKS key; ``dp``: whether sites train with DP-SGD. ``bound`` / ``noise_std`` override the
    derived figures (``noise_std``: per-coordinate DP noise std of one site's *weighted* update
    n_k/N * delta_k).
    """

    lr: float | None = None
    local_steps: int | None = None
    min_local_steps: int | None = None
    sites: int = 1
    rounds: int = 1
    dp: bool = True
    bound: float | None = None
    noise_std: float | None = None
    error_ratio: float = DEFAULT_ERROR_RATIO
    relative_error: float = DEFAULT_RELATIVE_ERROR

    def __post_init__(self) -> None:
        for name in ("lr", "bound", "noise_std", "error_ratio", "relative_error"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"update plan {name}={value!r} must be a positive finite number")
        for name in ("local_steps", "min_local_steps", "sites", "rounds"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"update plan {name}={value!r} must be a positive integer")
        fewest, most = self.min_local_steps, self.local_steps
        if fewest is not None and most is not None and fewest > most:
            raise ConfigError(f"update plan min_local_steps={self.min_local_steps} exceeds local_steps="
                              f"{self.local_steps} (the busiest site's steps)")
        if self.bound is None and (self.lr is None or self.local_steps is None):
            raise ConfigError("the update plan needs the learning rate and the local steps per round "
                              "(--lr and --local-steps), or an explicit bound (--update-bound)")
        if self.dp and self.noise_std is None and (self.lr is None or self.local_steps is None):
            raise ConfigError("under DP the update plan needs the learning rate and the local steps (--lr and "
                              "--local-steps) to derive the noise std, or the noise std itself (--noise-std)")

    @property
    def update_bound(self) -> float:
        """Largest |value| of a weighted update: ``lr * local_steps`` unless given."""
        if self.bound is not None:
            return float(self.bound)
        return ADAM_STEP_BOUND * float(self.lr) * int(self.local_steps)  # type: ignore[arg-type]

    @property
    def weighted_noise_std(self) -> float | None:
        """Per-coordinate DP noise std of one site's weighted update (None without DP).

        ``lr * sqrt(min_local_steps)`` for a site's delta (Adam under DP noise), times ``1 / sites``:
        equal weights give the aggregate its least noise (see packing.py, section 3)."""
        if not self.dp:
            return None
        if self.noise_std is not None:
            return float(self.noise_std)
        steps = self.min_local_steps or self.local_steps
        return float(self.lr) * math.sqrt(int(steps)) / self.sites  # type: ignore[arg-type]

    @property
    def max_step(self) -> float:
        """Largest quantisation step whose error std (at most step / 2) meets the plan's rule."""
        noise = self.weighted_noise_std
        if noise is not None:
            return 2.0 * self.error_ratio * noise
        return 2.0 * self.relative_error * self.update_bound

    @property
    def quant_bits(self) -> int:
        """Fewest bits with ``bound / 2**bits <= max_step``."""
        bits = max(1, math.ceil(math.log2(self.update_bound / self.max_step) - 1e-12))
        if bits > MAX_QUANT_BITS:
            raise ConfigError(
                f"the plan asks for a quantisation step of {self.max_step:.3g} within a bound of "
                f"{self.update_bound:.3g}: {bits} bits, more than the {MAX_QUANT_BITS} a lane can carry; "
                "check the learning rate, local steps and noise std of the plan"
            )
        return bits

    def describe(self) -> dict[str, Any]:
        """The derived figures (for logs, manifests and benchmarks)."""
        noise = self.weighted_noise_std
        bits = self.quant_bits
        step = self.update_bound / 2.0**bits
        return {"bound": self.update_bound, "noise_std": noise, "quant_bits": bits, "step": step,
                "error_std_max": step / 2, "error_to_noise_max": None if noise is None else step / 2 / noise}


def plan_params(plan: UpdatePlan, *, rounding: str = "stochastic", poly_modulus_degree: int = 8192,
                max_bytes_per_param: float | None = 8.0) -> Any:
    """CkksParams whose packing carries ``plan``'s updates: its bound, its step, ``sites x rounds`` summands.

    ConfigError (saying what to change) when the lanes that headroom needs do not fit one data prime
    or cost more than ``max_bytes_per_param`` for the global state.
    """
    from fedfms_secure.he.packing import choose_params

    bits = plan.quant_bits
    try:
        params = choose_params(bound=plan.update_bound, sites=plan.sites, rounds=plan.rounds, quant_bits=bits,
                               rounding=rounding, poly_modulus_degree=poly_modulus_degree,
                               max_bytes_per_param=max_bytes_per_param)
    except ConfigError as exc:
        rule = (f"error std <= {plan.error_ratio:g} x the DP noise std {plan.weighted_noise_std:.3g}"
                if plan.dp else f"error std <= {plan.relative_error:g} x the bound")
        raise ConfigError(
            f"the update plan (bound {plan.update_bound:.3g}, {rule}) needs {bits}-bit quantisation, and "
            f"{plan.sites} sites x {plan.rounds} rounds of headroom on top of it do not fit: {exc}. Plan fewer "
            "rounds per CKKS key (rotate it with `keys rotate-he`), fewer sites per key, fewer local steps, or "
            "allow a larger error ratio"
        ) from None
    if not plan.dp:
        return params
    return replace(params, packing=replace(params.packing, noise_std=plan.weighted_noise_std))


def clip_to_bound(update: Any, bound: float) -> tuple[Any, int]:
    """``update`` clipped to ``+-bound`` and how many coordinates were clipped (a site logs the count).

    Clipping the weighted update is post-processing of a DP output: the guarantee is unaffected."""
    import numpy as np

    values = np.asarray(update, dtype=np.float64)
    if not math.isfinite(bound) or bound <= 0:
        raise ConfigError(f"the update bound {bound!r} must be a positive finite number")
    clipped = int(np.count_nonzero(np.abs(values) > bound))
    return (np.clip(values, -bound, bound) if clipped else values), clipped
