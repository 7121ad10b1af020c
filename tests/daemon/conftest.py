"""Fixtures of the daemon's tests; plain helpers live in modules beside them (dense_model.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from dense_model import dense_bundle


@pytest.fixture
def make_dense_bundle(tmp_path: Path) -> Callable[..., Path]:
    """Builds bundles around the tiny dense model (writing it needs onnx, from the train or dev extras)."""
    pytest.importorskip("onnx")
    made = iter(range(1000))

    def _make(**kw: object) -> Path:
        return dense_bundle(tmp_path / f"dense-bundle-{next(made)}", **kw)  # type: ignore[arg-type]

    return _make
