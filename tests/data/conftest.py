"""Shared fixtures for the data tests: a small synthetic federation written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfms_secure.data import synth_federation

SMALL_SHAPE = (32, 32, 12)


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synthetic sites (read-only: tests that modify files copy a site first)."""
    return synth_federation(tmp_path_factory.mktemp("fed"), sites=3, seed=7, shape=SMALL_SHAPE)
