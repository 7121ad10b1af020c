"""SIGHUP reloads bundle, labels and campaigns between frames; a bad bundle is refused."""

import json
import signal
import time
from pathlib import Path

import pytest

from helpers import receive
from retrofit_agent.contract.bundle import read_manifest, write_manifest

pytestmark = pytest.mark.integration


def write_cfg(path: Path, bundle: Path, extra: str = "") -> None:
    path.write_text(f'[model]\nbundle = "{bundle}"\n{extra}')


def metric(text: str, prefix: str) -> float:
    return float([l for l in text.splitlines() if l.startswith(prefix)][0].split()[-1])


def test_sighup_swaps_in_a_new_bundle_without_restarting_outputs(
    start_agent, subscriber, clip, bundle_copy, seeded_bundle, tmp_path
):
    m = read_manifest(bundle_copy)
    write_manifest(bundle_copy, m.model_copy(update={"version": "2.0.0-test"}))
    cfg = tmp_path / "agent.toml"
    write_cfg(cfg, seeded_bundle)
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--loop", "--realtime")
    sub = subscriber(agent.endpoint, ("tags", "events"))
    agent.wait_ready()
    port_before = agent.metrics_port
    write_cfg(cfg, bundle_copy)
    time.sleep(0.5)
    agent.proc.send_signal(signal.SIGHUP)
    msgs = receive(sub, 5.0)
    text = agent.scrape()  # same endpoint, same process
    assert agent.stop() == 0
    tags = [m for t, m in msgs if t == "tags"]
    models = [m["model"] for m in tags]
    assert models[0].endswith("0.1.0-reference") and models[-1] == "retrofit-reference-untrained@2.0.0-test"
    switch = models.index(models[-1])
    assert all(x == models[-1] for x in models[switch:]), "no flip-flop after the swap"
    seqs = [m["seq"] for m in tags]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "publisher kept running: seq has no gap"
    offs = [m for t, m in msgs if t == "events" and m["event"] == "tag_off"]
    assert any(e["model"].endswith("0.1.0-reference") for e in offs), "the old model's tags are closed"
    assert metric(text, 'retrofit_reloads_total{result="ok"}') == 1
    assert 'bundle_version="2.0.0-test"' in text and agent.metrics_port == port_before
    assert "reload_applied" in agent.logs()


def test_sighup_refuses_a_bad_bundle_and_keeps_running(
    start_agent, subscriber, clip, bundle_copy, seeded_bundle, tmp_path
):
    with open(bundle_copy / "student.int8.onnx", "r+b") as f:
        f.seek(4096)
        f.write(b"\x00" * 16)
    cfg = tmp_path / "agent.toml"
    write_cfg(cfg, seeded_bundle)
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--loop", "--realtime")
    sub = subscriber(agent.endpoint, ("tags",))
    agent.wait_ready()
    write_cfg(cfg, bundle_copy)
    agent.proc.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    msgs = receive(sub, 1.5)
    text = agent.scrape()
    assert agent.stop() == 0
    assert msgs and all(m["model"].endswith("0.1.0-reference") for _, m in msgs)
    assert metric(text, 'retrofit_reloads_total{result="failed"}') == 1
    failed = [json.loads(l) for l in agent.logs().splitlines() if '"reload_failed"' in l]
    assert failed and "sha256 mismatch" in failed[0]["error"]


def test_sighup_changes_campaigns(start_agent, subscriber, clip, seeded_bundle, tmp_path):
    store = tmp_path / "store"
    campaign = (
        '[[collect.campaigns]]\nname = "{name}"\nmin_interval_s = 0\nmax_per_hour = 100000\n'
        'rule = {{ any_of = ["cyclists.present"] }}\n[collect.store]\ndirectory = "{store}"\n'
    )
    cfg = tmp_path / "agent.toml"
    write_cfg(cfg, seeded_bundle, campaign.format(name="first", store=store))
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--loop", "--realtime")
    sub = subscriber(agent.endpoint, ("captures",))
    agent.wait_ready()
    time.sleep(1.0)
    write_cfg(cfg, seeded_bundle, campaign.format(name="second", store=store))
    agent.proc.send_signal(signal.SIGHUP)
    msgs = receive(sub, 4.0)
    assert agent.stop() == 0
    names = [m["campaign"] for _, m in msgs]
    assert names[0] == "first" and names[-1] == "second"
    assert (store / "second").is_dir()
