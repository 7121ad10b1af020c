"""Shared pieces of the distillation tests: generated images and tiny configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models" / "configs" / "tiny.toml"


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 generated scenes (PNG), written by the toolchain's own generator."""
    from retrofit_agent.train.synthetic import write_images

    root = tmp_path_factory.mktemp("images")
    write_images(root, 320, seed=1)
    return root


def tiny_config(out: Path, train: list[str], **sections: dict[str, Any]):
    """models/configs/tiny.toml with the run in ``out``, data from ``train``, no progress bar."""
    from retrofit_agent.daemon.config import deep_merge
    from retrofit_agent.train.config import load_distill_config

    base = {
        "data": {"train": train, "workers": 0},
        "run": {"out_dir": str(out), "progress": False},
        "bank": {"prompts_file": str(REPO / "models" / "prompts" / "automotive.toml")},
    }
    return load_distill_config(TINY, deep_merge(base, sections))


@pytest.fixture
def fresh_logging():
    """For tests that call a CLI's ``main()`` in-process: it configures structlog onto the stderr
    pytest captured for that test, which is closed afterwards; later tests must not log there."""
    yield
    import structlog

    structlog.reset_defaults()
