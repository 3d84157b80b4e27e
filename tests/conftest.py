"""Shared fixtures. Tests that need the licensed material in ../shared skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MER_SHARED_DATA", REPO.parent / "shared" / "data"))

# Keep tests from oversubscribing the two CI cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def annotations_dir() -> Path:
    """../shared/data/annotations (public coding sheets)."""
    return _shared("annotations")


@pytest.fixture(scope="session")
def composite_dir() -> Path:
    """../shared/data/megc2019-composite (HTNet-format CASME II + SMIC part)."""
    return _shared("megc2019-composite")


@pytest.fixture(scope="session")
def casme2_clip_dir() -> Path:
    """../shared/data/casme2-clip (10 real CASME II frames)."""
    return _shared("casme2-clip")
