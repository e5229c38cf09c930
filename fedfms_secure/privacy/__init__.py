"""Differential privacy: budget, noise calibration, the persisted accountant, Opacus wiring.

The record is a patient by default (``units``: a dataset indexed by patient, one random slice per
sampled patient per step); ``planning`` turns a site's patient count and the plan into q, steps
and delta; ``site`` persists the accountant and refuses a rolled-back or reset budget; ``budget``
keeps the ledger; ``engine`` wires Opacus. It may import torch, Opacus, ``errors`` and
``atomic``; nothing of the federation (``he``, ``keys``, ``transport``, ``server``, ``site``).
"""

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
