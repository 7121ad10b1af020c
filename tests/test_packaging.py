"""What a newcomer needs to install it: the README's Installation section tells the truth,
`python -m build` makes a wheel, the licence is there, and the odds and ends behave."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO

README = (REPO / "README.md").read_text()
TEST_SH = (REPO / "scripts" / "test.sh").read_text()


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_license_is_the_apache_2_text_pyproject_declares():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()


def test_installation_covers_runtime_wheel_and_train_extra():
    install = _section("Installation")
    assert "pip install ." in install and "python -m build" in install and ".whl" in install
    assert "'.[train]'" in install
    pins = re.search(r'pip_q "(torch==[\d.]+)" "(torchvision==[\d.]+)"', TEST_SH)
    assert pins, "scripts/test.sh no longer pins torch as the README says"
    assert f"{pins[1]} {pins[2]}" in install  # the same pins as the CI environment
    assert "runs on a CPU" in install


def test_installation_lists_every_debian_package_test_sh_installs():
    packages = re.search(r'DEB_PACKAGES="([^"]+)"', TEST_SH)[1].split()
    install = _section("Installation")
    for pkg in packages:
        assert f"`{pkg}`" in install, pkg


def test_quick_start_says_where_the_programs_are():
    quick = _section("Quick start")
    assert "`.venv/bin/retrofit-agent`" in quick and "`.venv/bin/retrofit-model`" in quick


@pytest.mark.integration
@pytest.mark.slow
def test_python_m_build_makes_a_wheel_with_both_programs(tmp_path):
    pytest.importorskip("build")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = tmp_path.glob("retrofit_agent-*-py3-none-any.whl")
    assert list(tmp_path.glob("retrofit_agent-*.tar.gz"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "retrofit-agent = retrofit_agent.daemon.cli:main" in entry_points
    assert "retrofit-model = retrofit_agent.train.cli:main" in entry_points
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "retrofit_agent/train/model_configs/retrofit-tiny-clip.json" in names
    assert not [n for n in names if n.startswith(("tests/", "models/"))]


def test_install_sh_help_is_its_comment_block_only():
    r = subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("#") for line in lines)
    assert "set -euo pipefail" not in r.stdout
    assert any("--destdir" in line for line in lines)


def test_toolchain_outputs_are_ignored_by_git():
    paths = ["bundles/b3-1.0.0/manifest.json", "eval/b3-1.0.0/auroc.png"]
    r = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.split() == paths
