"""deploy/install.sh into a fleet image root (DESTDIR): the layout the unit expects, the user
created and the unit enabled offline, and the installed daemon runs with Debian's python3."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_helpers import DEPLOY, need, read_env

ENV = read_env(DEPLOY / "arm64" / "runtime.env")


@pytest.mark.integration
@pytest.mark.slow
def test_install_into_an_image_root_gives_a_working_enabled_service(tmp_path: Path, clip: Path):
    exe = need("systemd-analyze")
    if not Path("/usr/lib/systemd/system/multi-user.target").exists():
        pytest.skip("no systemd unit directory on this host; apt-get install systemd (scripts/test.sh does)")
    root = tmp_path / "image"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    # The venv's interpreter carries this machine's pip configuration (index, wheel cache).
    r = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--destdir", str(root)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    site = root / ENV["SITE"].lstrip("/")
    assert (root / ENV["PREFIX"].lstrip("/") / "bin/retrofit-agent").stat().st_mode & 0o111
    assert (root / "etc/retrofit-agent/agent.toml").read_text() == (DEPLOY / "agent.toml").read_text()
    assert (root / "usr/share/retrofit-agent/bundles/reference/manifest.json").exists()
    assert (root / "etc/systemd/system/multi-user.target.wants/retrofit-agent.service").is_symlink()
    assert any(l.startswith("retrofit-agent:") for l in (root / "etc/passwd").read_text().splitlines())
    assert not (site / "bin").exists(), "console scripts with the build host's shebang must not ship"
    v = subprocess.run([exe, "verify", f"--root={root}", "retrofit-agent.service"], capture_output=True, text=True)
    assert v.returncode == 0 and not (v.stdout + v.stderr).strip(), v.stdout + v.stderr

    # The installed tree alone (no checkout, no venv) runs the daemon under Debian's python3.
    debian_python = Path("/usr/bin/python3")
    probe = (
        subprocess.run(
            [debian_python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
        )
        if debian_python.exists()
        else None
    )
    if probe is None or probe.stdout.strip() != ENV["PYTHON_VERSION"]:
        pytest.skip(f"/usr/bin/python3 is not Python {ENV['PYTHON_VERSION']} here; layout checked, run skipped")
    run = subprocess.run(
        [
            debian_python,
            "-s",
            "-m",
            "retrofit_agent",
            "--config",
            str(root / "etc/retrofit-agent/agent.toml"),
            "--camera",
            str(clip),
            "--bundle",
            str(root / "usr/share/retrofit-agent/bundles/reference"),
            "--publish",
            f"ipc://{tmp_path}/pub.sock",
            "--no-metrics",
            "--max-frames",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "PYTHONPATH": str(site),
            "RETROFIT_COLLECT__STORE__DIRECTORY": str(tmp_path / "captures"),
        },
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        '"max_frames_reached"' in run.stderr
        and str(site)
        in subprocess.run(
            [debian_python, "-s", "-c", "import retrofit_agent; print(retrofit_agent.__file__)"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={"PYTHONPATH": str(site)},
        ).stdout
    )
