"""Prometheus and Grafana assets in deploy/: promtool's checks and unit tests, then a real
Prometheus server (Debian's) scraping a running daemon and evaluating the recording rules."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from deploy_helpers import DEPLOY, REPO, need, report
from helpers import SEEDED, agent_command, free_port

PROM = DEPLOY / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "retrofit-agent.json"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def rules_of(kind: str) -> list[dict]:
    return [r for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if kind in r]


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


# --------------------------------------------------------------------------- promtool


def test_promtool_check_config():
    r = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in r.stdout + r.stderr


def test_promtool_check_rules():
    r = promtool("check", "rules", *map(str, RULES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests_pass():
    r = promtool("test", "rules", *map(str, RULE_TESTS))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not():
    alerts = {r["alert"] for r in rules_of("alert")}
    assert {
        "RetrofitAgentDown",
        "RetrofitNoFrames",
        "RetrofitLatencyP99OverBudget",
        "RetrofitDropRateHigh",
        "RetrofitCameraReconnectStorm",
        "RetrofitModelNotLoaded",
    } <= alerts
    fired, quiet = set(), set()
    for f in RULE_TESTS:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fired if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert alerts <= fired, f"alerts never tested firing: {alerts - fired}"
    assert alerts <= quiet, f"alerts never tested quiet: {alerts - quiet}"


def test_dashboard_is_valid_grafana_json_using_our_recording_rules():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"] and {v["name"] for v in dash["templating"]["list"]} >= {"instance"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    recorded = {r["record"] for r in rules_of("record")}
    used = {name for q in dashboard_queries() for name in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", q)}
    assert used and used <= recorded, used - recorded
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("latency", "per stage", "frames per second", "dropped", "reconnects", "tags per minute"):
        assert needed in titles, needed


# --------------------------------------------------------------------------- a real daemon and a real Prometheus


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The daemon on the sample clip, paced like a 15 fps camera; yields its metrics address."""
    tmp = tmp_path_factory.mktemp("prom-daemon")
    port = free_port()
    log = open(tmp / "agent.log", "wb")
    proc = subprocess.Popen(
        agent_command(
            "--camera",
            str(REPO / "models/sample/drive.mp4"),
            "--loop",
            "--realtime",
            "--bundle",
            str(SEEDED),
            "--threads",
            "2",
            "--publish",
            f"ipc://{tmp}/pub.sock",
            "--metrics-address",
            f"127.0.0.1:{port}",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / "agent.log").read_text()[-2000:]
        try:
            if "retrofit_frames_processed_total 0.0" not in get(f"http://{address}/metrics"):
                break
        except OSError:
            pass
        time.sleep(0.2)
    yield address
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    log.close()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def metric_names(exposition: str) -> set[str]:
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            names |= {name, f"{name}_total", f"{name}_info", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.mark.integration
def test_every_metric_the_dashboard_and_rules_query_is_exported_by_the_daemon(daemon: str):
    exported = metric_names(get(f"http://{daemon}/metrics"))
    queries = dashboard_queries() + [r["expr"] for r in rules_of("record") + rules_of("alert")]
    used = {m for q in queries for m in re.findall(r"(?<![:\w])retrofit_[a-z0-9_]+\b(?!:)", q)}  # not recording rules
    assert len(used) >= 10
    assert used <= exported, f"queried but not exported: {sorted(used - exported)}"


@pytest.fixture(scope="module")
def prometheus(daemon: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's prometheus on loopback, with deploy/prometheus/prometheus.yml's job and rule files,
    scraping and evaluating every second instead of every 15 s."""
    exe = need("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM / f) for f in cfg["rule_files"]]
    (job,) = cfg["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"][0]["targets"] = [daemon]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
        try:
            get(f"{url}/-/ready")
            break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


def query(url: str, expr: str) -> list[dict]:
    body = json.loads(get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(url: str, expr: str, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := query(url, expr):
            return result
        time.sleep(1)
    raise AssertionError(f"{expr} returned nothing within {timeout}s")


@pytest.mark.integration
@pytest.mark.slow
def test_real_prometheus_records_latency_quantiles_from_the_daemon(prometheus: str, request: pytest.FixtureRequest):
    e2e = {}
    for q in ("p50", "p95", "p99"):
        (sample,) = wait_for(prometheus, f"instance:retrofit_end_to_end_latency_seconds:{q}_5m")
        assert sample["metric"]["job"] == "retrofit-agent"
        e2e[q] = float(sample["value"][1])
    assert 0 < e2e["p50"] <= e2e["p95"] <= e2e["p99"] <= 2.5, e2e
    stages = {
        s["metric"]["stage"]: float(s["value"][1])
        for s in wait_for(prometheus, "instance_stage:retrofit_stage_duration_seconds:p50_5m")
    }
    assert set(stages) == {"capture_wait", "preprocess", "inference", "labelling", "regions", "publish"}
    # The int8 model takes milliseconds, far more than labelling a 33-label bank.
    assert 0.001 < stages["inference"] < 2.5 and stages["labelling"] < stages["inference"]
    (fps,) = wait_for(prometheus, "instance:retrofit_frames_processed:rate1m")
    assert float(fps["value"][1]) > 0  # rate() over 1m divides by 60 s even when the daemon is younger
    report(
        request,
        "Prometheus-recorded latency on this host (s)",
        {
            **{f"end_to_end_{k}": round(v, 4) for k, v in e2e.items()},
            "inference_p50": round(stages["inference"], 4),
            "frames_per_s": round(float(fps["value"][1]), 1),
        },
    )


@pytest.mark.integration
@pytest.mark.slow
def test_rules_evaluate_cleanly_and_a_healthy_daemon_raises_no_alert(prometheus: str):
    wait_for(prometheus, "instance:retrofit_end_to_end_latency_seconds:p99_5m")
    groups = json.loads(get(f"{prometheus}/api/v1/rules"))["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(rules_of("record")) + len(rules_of("alert"))
    for r in rules:
        assert r["health"] == "ok" and not r.get("lastError"), r
    alerts = json.loads(get(f"{prometheus}/api/v1/alerts"))["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"] in ("RetrofitAgentDown", "RetrofitModelNotLoaded")]
    (up,) = query(prometheus, 'up{job="retrofit-agent"}')
    assert up["value"][1] == "1"


@pytest.mark.integration
@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_the_running_daemon(prometheus: str):
    wait_for(prometheus, "instance:retrofit_frames_dropped:ratio_rate5m")
    empty = []
    for expr in dashboard_queries():
        # Grafana's variables, as Grafana would substitute them.
        expr = expr.replace("$instance", ".*").replace("$__rate_interval", "1m")
        if not query(prometheus, expr):
            empty.append(expr)
    assert not empty, f"dashboard queries with no data: {empty}"
