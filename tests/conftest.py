"""Shared fixtures: tiny real open_clip models written as safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_open_clip_base


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    return make_open_clip_base(tmp_path / "base.safetensors")
