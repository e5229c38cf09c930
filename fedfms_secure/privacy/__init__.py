"""Differential privacy: budget, noise calibration, the persisted accountant, Opacus wiring."""

from __future__ import annotations

from fedfms_secure.privacy.accounting import calibrate_noise, epsilon_of
from fedfms_secure.privacy.config import ACCOUNTANTS, PrivacyConfig
from fedfms_secure.privacy.engine import PrivateTrainer, make_private_trainer
from fedfms_secure.privacy.site import STATE_FILE, SitePrivacy, check_against_server
from fedfms_secure.privacy.units import UNITS

__all__ = [
    "ACCOUNTANTS",
    "STATE_FILE",
    "PrivacyConfig",
    "PrivateTrainer",
    "SitePrivacy",
    "UNITS",
    "check_against_server",
    "calibrate_noise",
    "epsilon_of",
    "make_private_trainer",
]
