"""Epsilon from the patient-level (sigma, q, steps) against Google's independent ``dp-accounting``.

Opacus' RDP accountant is checked against ``dp_accounting.rdp.RdpAccountant`` and its PRV
accountant against ``dp_accounting.pld.PLDAccountant`` (privacy loss distributions: the same
quantity, computed another way), both for the Poisson-sampled Gaussian mechanism. The plans are
those a site derives from its patients (:func:`plan_records`).
"""

from __future__ import annotations

import pytest

dp_accounting = pytest.importorskip("dp_accounting", reason="install the [test] extra (dp-accounting)")

from fedfms_secure.privacy.accounting import calibrate_noise, epsilon_of  # noqa: E402
from fedfms_secure.privacy.budget import resolve_delta  # noqa: E402

# (training patients, expected patients per step, steps): the demo's sites, a small and a larger one
PLANS = [(75, 32, 75), (30, 16, 50), (400, 32, 325)]


def _event(sigma: float, q: float, steps: int):
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, gaussian), steps)


def _google_rdp(sigma: float, q: float, steps: int, delta: float) -> float:
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 257))
    acc = dp_accounting.rdp.RdpAccountant(orders)
    acc.compose(_event(sigma, q, steps))
    return acc.get_epsilon(delta)


def _google_pld(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(_event(sigma, q, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("patients,per_step,steps", PLANS)
@pytest.mark.parametrize("accountant,google", [("rdp", _google_rdp), ("prv", _google_pld)])
def test_epsilon_matches_dp_accounting_within_one_percent(patients, per_step, steps, accountant, google) -> None:
    q = per_step / patients
    delta = resolve_delta(None, patients, "patient")
    sigma = calibrate_noise(target_epsilon=8.0, delta=delta, sample_rate=q, steps=steps, accountant=accountant)
    ours = epsilon_of([(sigma, q, steps)], delta=delta, accountant=accountant)
    theirs = google(sigma, q, steps, delta)
    assert ours == pytest.approx(theirs, rel=0.01), (accountant, ours, theirs)
    assert ours <= 8.0 + 1e-6
