"""Privacy maths as pure functions over an accountant history.

A history is Opacus' format: a list of ``(noise_multiplier, sample_rate, steps)`` triples. No
state is kept here; :class:`~fedfms_secure.privacy.site.SitePrivacy` holds the history.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedfms_secure.errors import ConfigError

History = list[tuple[float, float, int]]

# Opacus' default RDP orders stop at 63; early in a run (few steps) the best order is larger, so
# reporting also tries larger ones. A larger set can only lower the (still valid) upper bound.
RDP_ALPHAS: list[float] = list(RDPAccountant.DEFAULT_ALPHAS) + list(range(64, 257, 8))
_ALPHA_WARNING = "Optimal order is the"  # Opacus suggesting other orders; the bound stays valid


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier that spends ``target_epsilon`` in exactly ``steps`` DP-SGD steps."""
    if not 0 < sample_rate <= 1:
        raise ConfigError(
            f"sample_rate must be in (0, 1], got {sample_rate}; use batch_size / num_samples"
        )
    if steps < 1:
        raise ConfigError(f"planned_steps must be >= 1, got {steps}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        return float(sigma)
    except ValueError as exc:
        raise ConfigError(
            f"cannot reach epsilon={target_epsilon} over {steps} steps at sample rate "
            f"{sample_rate:.4g} ({exc}); raise the epsilon or plan fewer rounds/epochs"
        ) from exc


def epsilon_of(
    history: Sequence[tuple[float, float, int]], *, delta: float, accountant: str
) -> float:
    """Epsilon spent by ``history`` at ``delta`` (0.0 for an empty history)."""
    if not history or all(steps == 0 for _, _, steps in history):
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    if accountant != "rdp":
        return float(acc.get_epsilon(delta=delta))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
        return float(acc.get_epsilon(delta=delta, alphas=RDP_ALPHAS))


def extend_history(history: Sequence[tuple[float, float, int]], *, noise_multiplier: float,
                   sample_rate: float, steps: int) -> History:
    """``history`` followed by ``steps`` more steps, merged as Opacus' accountants merge them."""
    out: History = [(float(s), float(q), int(n)) for s, q, n in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        s, q, n = out.pop()
        out.append((s, q, n + steps))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def total_steps(history: Sequence[tuple[float, float, int]]) -> int:
    """Number of DP-SGD steps recorded in ``history``."""
    return sum(int(n) for _, _, n in history)


__all__ = [
    "RDP_ALPHAS",
    "History",
    "calibrate_noise",
    "epsilon_of",
    "extend_history",
    "total_steps",
]
