"""Shared fixtures. Real benchmark samples live in ../shared/data; tests that need them skip with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmrag_lite.config import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real benchmark samples not found: ../shared/data is absent (set MMRAG_SHARED_DATA to point at them)")
    return path
