"""Helpers shared by the deployment tests (not a conftest: tests/conftest.py is imported by name)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = REPO / "systemd" / "retrofit-agent.service"
APT_HINT = "installed by scripts/test.sh (CI runs it)"


def need(program: str) -> str:
    """The program's path, or skip the test naming the Debian package that provides it."""
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} not found; {APT_HINT}")
    return path


def report(request: pytest.FixtureRequest, name: str, value: object) -> None:
    """Print a measured figure in the test run's output (and the JUnit XML), never judge it."""
    if hasattr(request.node, "user_properties"):  # tests, not module-scoped fixtures
        request.node.user_properties.append((name, value))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n[deploy figure] {name}: {value}", flush=True)


def read_env(path: Path) -> dict[str, str]:
    """KEY=value lines of a shell env file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def read_list(path: Path) -> list[str]:
    """Non-comment, non-empty lines."""
    return [l.split("#", 1)[0].strip() for l in path.read_text().splitlines() if l.split("#", 1)[0].strip()]


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Section.Key`` → every value assigned in a systemd unit file (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
            continue
        key, value = line.split("=", 1)
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out
