"""budget.max_cpu on a real daemon: process CPU measured from /proc stays within the budget."""

import os
import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _sample(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_half_a_core_budget_holds_on_a_30fps_source_and_skipped_frames_are_counted_apart(
    tmp_path: Path,
    start_agent,
):
    from retrofit_agent.contract.sample import write_clip

    clip = write_clip(tmp_path / "drive30.mp4", n_frames=90, fps=30.0)
    agent = start_agent(
        "--camera",
        str(clip),
        "--loop",
        "--realtime",
        "--threads",
        "1",
        env={"RETROFIT_BUDGET__MAX_CPU": "0.5", "RETROFIT_MODEL__TUNE_BUDGET_S": "0"},
    )
    agent.wait_ready(60)
    time.sleep(8)  # the window fills and the interval settles
    t0, c0 = time.monotonic(), _cpu_seconds(agent.proc.pid)
    time.sleep(20)
    cores = (_cpu_seconds(agent.proc.pid) - c0) / (time.monotonic() - t0)
    scrape = agent.scrape()
    agent.stop()
    # 0.5 cores +- 0.1 (the benchmark holds it to +- 0.05 over 60 s; here other tests share the CPU)
    assert cores == pytest.approx(0.5, abs=0.1)
    assert _sample(scrape, 'retrofit_frames_skipped_total{reason="budget"}') > 0
    assert _sample(scrape, "retrofit_frames_processed_total") > 0
    assert _sample(scrape, "retrofit_cpu_cores") == pytest.approx(0.5, abs=0.15)
