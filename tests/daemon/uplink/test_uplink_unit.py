"""retrofit-uplink.service: verified by Debian's systemd-analyze, hardened like the daemon's unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
from deploy_helpers import DEPLOY, REPO, need, unit_settings

UNIT = REPO / "systemd" / "retrofit-uplink.service"
SYSUSERS = REPO / "systemd" / "retrofit-uplink.sysusers"
EXPOSURE_BUDGET = 2.0  # the daemon's unit's budget (measured here: see the README's Uplink section)


def test_uplink_unit_passes_systemd_analyze_verify(tmp_path: Path):
    exe = need("systemd-analyze")
    if not Path("/usr/lib/systemd/system/multi-user.target").exists():
        pytest.skip("no systemd unit directory on this host; apt-get install systemd (scripts/test.sh does)")
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(UNIT, tmp_path / "usr/lib/systemd/system/retrofit-uplink.service")
    launcher = tmp_path / "opt/retrofit-agent/bin/retrofit-agent"
    launcher.parent.mkdir(parents=True)
    shutil.copy(DEPLOY / "bin" / "retrofit-agent", launcher)
    r = subprocess.run(
        [exe, "verify", f"--root={tmp_path}", "retrofit-uplink.service"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_uplink_unit_security_exposure_is_within_the_daemons_budget():
    exe = need("systemd-analyze")
    r = subprocess.run([exe, "security", "--offline=yes", str(UNIT)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for retrofit-uplink\.service: (\d+\.\d)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    print(f"\n[uplink figure] systemd-analyze security exposure: {m.group(1)}")
    assert float(m.group(1)) <= EXPOSURE_BUDGET
    assert f"exposure **{m.group(1)}" in (REPO / "README.md").read_text(), "README's Uplink section states it"


def test_uplink_unit_is_notify_with_a_watchdog_and_may_delete_only_captures():
    s = {k: v[-1] for k, v in unit_settings(UNIT).items()}
    assert s["Service.Type"] == "notify" and int(s["Service.WatchdogSec"]) > 0
    assert s["Service.RestartPreventExitStatus"] == "2" and s["Service.ProtectSystem"] == "strict"
    assert s["Service.ReadWritePaths"] == "-/var/lib/retrofit-agent/captures"
    assert "retrofit-agent" in s["Service.SupplementaryGroups"].split()
    assert s["Service.ExecStart"].endswith("uplink --config /etc/retrofit-agent/uplink.toml")
    install = (DEPLOY / "install.sh").read_text()
    assert "retrofit-uplink.service" in install and "retrofit-uplink.conf" in install


def test_sysusers_puts_the_uplink_user_in_the_daemons_group(tmp_path: Path):
    exe = need("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    for f in (REPO / "systemd" / "retrofit-agent.sysusers", SYSUSERS):
        r = subprocess.run([exe, f"--root={tmp_path}", str(f)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    group = [l.split(":") for l in (tmp_path / "etc/group").read_text().splitlines() if l.startswith("retrofit-agent:")]
    assert "retrofit-uplink" in group[0][3].split(",")
