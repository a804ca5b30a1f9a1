"""Shared test set-up: 8 fake CPU devices (set before jax is imported) and the team's parity fixtures."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """`../shared/fixtures` beside the project root (only tests read it)."""
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"parity fixtures not found at {FIXTURES}")
    return FIXTURES
