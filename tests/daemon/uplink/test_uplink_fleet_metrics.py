"""Fleet metrics: Debian's prometheus in agent mode (deploy/prometheus/agent/vehicle.yml) scrapes a
running uplink and remote-writes to a central Prometheus (central.yml, remote-write receiver).
The central end is stopped for 60 s; once it is back, a range query covers the outage with no
missing sample."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from uplink_helpers import Uplink, wait_port, wait_until

from helpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
from deploy_helpers import DEPLOY, need  # noqa: E402

AGENT = DEPLOY / "prometheus" / "agent"
SCRAPE_S = 1.0


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("promtool"), *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_vehicle_agent_config_and_the_central_one():
    r = promtool("check", "config", "--agent", str(AGENT / "vehicle.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "config", str(AGENT / "central.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load((AGENT / "vehicle.yml").read_text())
    assert {j["job_name"] for j in cfg["scrape_configs"]} == {"retrofit-agent", "retrofit-uplink"}
    assert "vehicle" in cfg["global"]["external_labels"] and cfg["remote_write"]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Prom:
    def __init__(self, tmp: Path, name: str, args: list[str]) -> None:
        self.tmp, self.name, self.args = tmp, name, args
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Prom:
        log = open(self.tmp / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            [need("prometheus"), *self.args, f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_port(self.port, self.proc, timeout=30)
        # The port opens before the TSDB (or the agent's WAL) has been replayed; until then every
        # query answers 503. /-/ready is Prometheus's own word for "serving".
        wait_until(lambda: _ready(self.port), 60, f"{self.name} ready", interval=0.5)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


@pytest.mark.integration
@pytest.mark.slow
def test_a_60_s_central_outage_leaves_no_missing_sample(tmp_path: Path):
    need("prometheus")
    uplink = Uplink(
        tmp_path,
        [
            "--endpoint",
            f"ipc://{tmp_path}/x.sock",
            "--mqtt",
            f"mqtt://127.0.0.1:{free_port()}",
            "--journal",
            str(tmp_path / "j"),
        ],
    ).start()
    uplink.wait_ready()
    central_cfg = tmp_path / "central.yml"
    central_cfg.write_text("global:\n  evaluation_interval: 15s\n")
    central = Prom(
        tmp_path,
        "central",
        [
            f"--config.file={central_cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            "--web.enable-remote-write-receiver",
        ],
    ).start()
    cfg = yaml.safe_load((AGENT / "vehicle.yml").read_text())
    cfg["global"].update(scrape_interval=f"{SCRAPE_S:g}s", external_labels={"vehicle": "car-metrics"})
    cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{free_port()}"]  # no daemon here
    cfg["scrape_configs"][1]["static_configs"][0]["targets"] = [f"127.0.0.1:{uplink.metrics_port}"]
    cfg["remote_write"][0]["url"] = f"http://127.0.0.1:{central.port}/api/v1/write"
    cfg["remote_write"][0]["queue_config"]["max_backoff"] = "2s"
    (tmp_path / "vehicle.yml").write_text(yaml.safe_dump(cfg))
    agent = Prom(
        tmp_path,
        "agent",
        [
            "--enable-feature=agent",
            f"--config.file={tmp_path / 'vehicle.yml'}",
            f"--storage.agent.path={tmp_path / 'agent-wal'}",
        ],
    ).start()
    expr = 'retrofit_uplink_backlog_messages{vehicle="car-metrics",job="retrofit-uplink"}'

    def query(q: str) -> list:
        url = f"http://127.0.0.1:{central.port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        return get(url)["data"]["result"]

    try:
        wait_until(lambda: query(expr), 60, "samples at the central end", interval=0.5)
        time.sleep(3)
        central.stop()
        down_from = time.time()
        time.sleep(60)
        down_to = time.time()
        central.start()
        # Caught up once the central end holds samples from after its restart.
        wait_until(
            lambda: [r for r in query(f"{expr}[10s]") if r["values"] and float(r["values"][-1][0]) > down_to + 5],
            90,
            "agent caught up",
            interval=1,
        )
        (series,) = query(f"{expr}[{int(time.time() - down_from) + 10}s]")
        stamps = [float(t) for t, _ in series["values"]]
        in_window = [t for t in stamps if down_from - 2 <= t <= down_to + 2]
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        print(
            f"\n[uplink figure] samples during the 60 s outage: {len(in_window)} (scrape every {SCRAPE_S:g} s); "
            f"largest gap {max(gaps):.2f} s"
        )
        assert len(in_window) >= (down_to - down_from) / SCRAPE_S * 0.95
        assert max(gaps) < 2.5 * SCRAPE_S, "no missing sample"
        # Every query of the uplink's Grafana dashboard returns data from the central end.
        dash = json.loads((DEPLOY / "grafana" / "retrofit-uplink.json").read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        titles = " ".join(p["title"].lower() for p in dash["panels"])
        assert all(w in titles for w in ("backlog", "oldest", "forward rate"))
        empty = [e for e in exprs if not query(e.replace("$vehicle", "car-metrics").replace("$__rate_interval", "1m"))]
        assert not empty, f"dashboard queries with no data: {empty}"
    finally:
        agent.stop()
        central.stop()
        uplink.stop()
