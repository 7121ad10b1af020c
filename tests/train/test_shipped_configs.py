"""Every recipe in models/configs/ loads with its own loader, and the chains' stage files exist:
the reference is built from seeds hours later, so a config that rotted must fail here first."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO

pytestmark = [pytest.mark.train]

CONFIGS = sorted((REPO / "models" / "configs").glob("*.toml"))


def _kind(path: Path) -> str:
    if path.name.startswith("chain-"):
        return "chain"
    return "teacher" if "teacher" in path.name else "distill"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_shipped_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # recipes name files relative to the repository
    if _kind(path) == "chain":
        from retrofit_agent.train.chain import load_chain_config

        cfg = load_chain_config(path)
        teacher, distill = [cfg.teacher, *cfg.teacher.pretrain], [cfg.distill, *cfg.distill.pretrain]
        for kind, phases in (("teacher", teacher), ("distill", distill)):
            for phase in phases:
                assert (REPO / phase.config).is_file(), phase.config
                assert _kind(REPO / phase.config) == kind, phase.config
    elif _kind(path) == "teacher":
        from retrofit_agent.train.teacher_train.config import load_teacher_train_config

        load_teacher_train_config(path)
    else:
        from retrofit_agent.train.config import load_distill_config

        load_distill_config(path)


def test_the_reference_recipe_runs_its_student_at_the_cameras_300():
    from retrofit_agent.train.chain import load_chain_config
    from retrofit_agent.train.config import load_distill_config

    cfg = load_chain_config(REPO / "models" / "configs" / "chain-reference.toml")
    assert load_distill_config(REPO / cfg.distill.config).student.input_size == 300
    assert cfg.export.input_size in (None, 300)
