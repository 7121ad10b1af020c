"""Dockerfile.arm64 cannot be built here (no Docker engine), so it must not drift from what is
tested: the QEMU root filesystem recipe (deploy/arm64/rootfs.sh) reads the same package list,
wheel list and runtime.env, and these tests hold both files to them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy_helpers import DEPLOY, REPO, UNIT, read_env, read_list, unit_settings

DOCKERFILE = (REPO / "Dockerfile.arm64").read_text()
ARM64 = DEPLOY / "arm64"
RECIPE = (ARM64 / "rootfs.sh").read_text()
ENV = read_env(ARM64 / "runtime.env")
PINS = {canonicalize_name(Requirement(l).name): Requirement(l) for l in read_list(ARM64 / "runtime-requirements.txt")}
LAUNCHER = (DEPLOY / "bin" / "retrofit-agent").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1]) for l in joined.splitlines() if l.strip()]


STEPS = instructions(DOCKERFILE)


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for op, args in STEPS:
        if op == "FROM":
            out.append([])
        out[-1].append((op, args))
    return out


def test_both_stages_are_slim_debian_of_the_recipes_suite_on_arm64():
    froms = [args for op, args in STEPS if op == "FROM"]
    assert len(froms) == 2, "multi-stage: build, then runtime"
    for f in froms:
        assert f.startswith(f"--platform=linux/arm64 debian:{ENV['SUITE']}-slim"), f
    assert '"$SUITE"' in RECIPE and "--arch=arm64" in RECIPE


def test_image_and_rootfs_install_the_same_debian_packages():
    packages = read_list(ARM64 / "packages.txt")
    assert "python3" in packages
    for stage in stages():
        runs = " ".join(a for op, a in stage if op == "RUN")
        copies = " ".join(a for op, a in stage if op == "COPY")
        assert "deploy/arm64/packages.txt" in copies and "packages.txt)" in runs and "apt-get install" in runs
        # Nothing installed beside the list, except pip in the build stage (it never reaches the runtime).
        extra = re.search(r"--no-install-recommends (.*?)\$\(", runs).group(1).split()
        assert set(extra) <= {"python3-pip"}, extra
    # The recipe's debootstrap --include is the same file.
    assert "package_csv() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' \"$HERE/packages.txt\"" in RECIPE
    assert '--include="$(package_csv)"' in RECIPE


def test_image_and_rootfs_install_the_same_wheels_the_same_way():
    build = " ".join(a for op, a in stages()[0] if op == "RUN")
    flags = ("--no-deps", "--only-binary=:all:", f"--target {ENV['SITE']}", "runtime-requirements.txt")
    for flag in flags:
        assert flag in build, flag
    recipe_pip = RECIPE.split("python3 -m pip install", 1)[1].split("\n  #", 1)[0]
    for flag in ("--no-deps", "--only-binary=:all:", '--target "$tmp$SITE"', '"$HERE/runtime-requirements.txt"'):
        assert flag in recipe_pip, flag
    # Debian bookworm's python3 is the interpreter both use; the recipe asks pip for its ABI.
    assert ENV["SUITE"] == "bookworm" and ENV["PYTHON_VERSION"] == "3.11"
    assert "--python-version %s" in RECIPE and '"$PYTHON_VERSION"' in RECIPE


def test_wheel_list_is_the_runtime_closure_and_has_no_torch():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    env = {**default_environment(), "python_version": ENV["PYTHON_VERSION"], "platform_machine": "aarch64"}
    for dep in map(Requirement, pyproject["project"]["dependencies"]):
        if dep.marker and not dep.marker.evaluate(env):
            continue
        pin = PINS.get(canonicalize_name(dep.name))
        assert pin, f"{dep.name} (pyproject runtime dependency) missing from runtime-requirements.txt"
        (spec,) = pin.specifier
        assert spec.operator == "==" and dep.specifier.contains(spec.version), (dep, pin)
    assert not {"torch", "torchvision", "timm", "open-clip-torch", "onnx"} & set(PINS)
    # --no-deps installs exactly the list: each pinned package's own dependencies must be pinned
    # too (read from the same versions installed in this virtualenv).
    for name, pin in PINS.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{name} not installed here, cannot read its dependencies")
        if dist.version != next(iter(pin.specifier)).version:
            pytest.skip(f"{name} {dist.version} installed here, {pin} pinned: cannot compare dependencies")
        for req in map(Requirement, dist.requires or []):
            if req.marker and not req.marker.evaluate({**env, "extra": ""}):
                continue
            assert canonicalize_name(req.name) in PINS, f"{name} needs {req}, which is not pinned"


def test_runtime_layout_matches_the_launcher_and_the_unit():
    runtime = stages()[1]
    copies = [a for op, a in runtime if op == "COPY"]
    assert f"--from=build {ENV['SITE']} {ENV['SITE']}" in copies
    assert f"deploy/bin/retrofit-agent {ENV['PREFIX']}/bin/retrofit-agent" in copies
    assert f"models/reference {ENV['BUNDLES']}/reference" in copies
    assert "deploy/agent.toml /etc/retrofit-agent/agent.toml" in copies
    assert f'PYTHONPATH="{ENV["SITE"]}' in LAUNCHER and "exec /usr/bin/python3 -m retrofit_agent" in LAUNCHER
    exec_start = unit_settings(UNIT)["Service.ExecStart"][-1]
    assert exec_start.startswith(f"{ENV['PREFIX']}/bin/retrofit-agent ")
    assert f"PREFIX={ENV['PREFIX']}" in (ARM64 / "runtime.env").read_text()


def test_runtime_stage_runs_as_a_non_root_video_member_with_retrofit_agent_as_entrypoint():
    runtime = stages()[1]
    (user,) = [a for op, a in runtime if op == "USER"]
    assert user not in ("root", "0")
    runs = " ".join(a for op, a in runtime if op == "RUN")
    assert re.search(rf"useradd .*--groups video {user}", runs)
    (entry,) = [json.loads(a) for op, a in runtime if op == "ENTRYPOINT"]
    assert entry[0] == "retrofit-agent"
    assert "torch" not in " ".join(a for _, a in STEPS)  # comments may say "no torch"


@pytest.mark.integration
def test_healthcheck_command_reports_a_ready_daemon_healthy(start_agent, clip: Path, seeded_bundle: Path):
    (health,) = [a for op, a in STEPS if op == "HEALTHCHECK"]
    cmd = json.loads(health.split("CMD", 1)[1])
    assert cmd[0] == "python3" and "127.0.0.1:9108/metrics" in cmd[-1]
    agent = start_agent("--camera", str(clip), "--loop", "--realtime", "--bundle", str(seeded_bundle))
    probe = [sys.executable, *cmd[1:-1], cmd[-1].replace("9108", str(agent.metrics_port))]
    agent.wait_ready()
    assert subprocess.run(probe, timeout=10).returncode == 0
    agent.stop()
    assert subprocess.run(probe, timeout=10, capture_output=True).returncode != 0, "a stopped daemon is unhealthy"
