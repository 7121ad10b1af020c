"""The quick-start demo reads well: a legend from the bundle's manifest first, the tags, then
a per-group summary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REFERENCE, REPO, SEEDED
from retrofit_agent.contract.bundle import read_manifest, write_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _demo(bundle: Path, frames: int = 6) -> subprocess.CompletedProcess:
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent), "BUNDLE": str(bundle)}
    return subprocess.run(
        ["bash", "scripts/demo.sh", "--max-frames", str(frames)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_prints_legend_tags_and_summary():
    if not (Path(sys.executable).parent / "retrofit-agent").exists():
        pytest.skip("the package's scripts are not installed in this environment")
    r = _demo(REFERENCE)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    manifest = read_manifest(REFERENCE)
    assert lines[0] == f"bundle {REFERENCE}: {manifest.model_id}, trained"
    assert any(line.startswith("  notice: ") and "synthetic" in line for line in lines[:3])
    assert any(line.startswith("tags   seq=0 ") for line in lines)
    summary = lines.index(f"summary: 6 frames from {manifest.model_id}")
    assert summary > max(i for i, line in enumerate(lines) if line.startswith("tags   "))
    groups = {line.split()[0] for line in lines[summary + 2 :] if not line.startswith("    ")}
    assert groups == {g.name for g in manifest.bank.groups}  # every group had a top label each frame
    assert "Traceback" not in r.stderr


def test_demo_legend_says_when_a_bundle_is_untrained(tmp_path):
    if not (Path(sys.executable).parent / "retrofit-agent").exists():
        pytest.skip("the package's scripts are not installed in this environment")
    bundle = tmp_path / "seeded"
    shutil.copytree(SEEDED, bundle)
    m = read_manifest(bundle)
    write_manifest(bundle, m.model_copy(update={"name": "b3-seeded"}))
    r = _demo(bundle, frames=3)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"bundle {bundle}: b3-seeded@{m.version}, UNTRAINED")
