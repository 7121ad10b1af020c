"""The daemon as users run it: a subprocess, a real ZeroMQ subscriber, real /metrics scrapes."""

import json
import signal
import socket
import time
from pathlib import Path

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import REPO, receive, run_cli

pytestmark = pytest.mark.integration

SCHEMA = json.loads((REPO / "deploy" / "messages.schema.json").read_text())


def validate(topic: str, msg: dict) -> None:
    name = {"tags": "TagsMessage", "events": "EventMessage", "status": "StatusMessage"}[topic]
    jsonschema.validate(msg, {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{name}"})


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_tags_events_and_metrics_from_a_running_daemon(start_agent, subscriber, clip: Path, seeded_bundle: Path):
    sub = None
    agent = start_agent("--camera", str(clip), "--loop", "--bundle", str(seeded_bundle), "--threads", "2")
    sub = subscriber(agent.endpoint)  # connects while the model loads
    agent.wait_ready()
    msgs = receive(sub, 4.0)
    text = agent.scrape()
    assert agent.stop() == 0

    tags = [m for t, m in msgs if t == "tags"]
    events = [m for t, m in msgs if t == "events"]
    assert len(tags) >= 10
    for topic, m in msgs:
        validate(topic, m)
        assert m["topic"] == topic
    seqs = [m["seq"] for m in tags]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "tags seq must be contiguous"
    assert tags[0]["model"] == "retrofit-reference-untrained@0.1.0-reference"
    assert {t["group"] for t in tags[0]["top"]} >= {"weather", "time_of_day", "vehicles"}
    assert tags[0]["latency"]["inference_ms"] > 0

    # Every change in the set of tags that are on is announced by an event on the same frame.
    by_frame = {m["frame_id"]: {(t["group"], t["label"]) for t in m["tags"]} for m in tags}
    assert events, "the seeded bundle turns at least one tag on at the first frame"
    for e in events:
        key = (e["tag"]["group"], e["tag"]["label"])
        if e["frame_id"] in by_frame:
            assert (key in by_frame[e["frame_id"]]) == (e["event"] == "tag_on")

    s = samples(text)
    processed = s[("retrofit_frames_processed_total", ())]
    assert processed >= len(tags)
    assert s[("retrofit_stage_duration_seconds_count", (("stage", "inference"),))] == processed
    assert s[("retrofit_end_to_end_latency_seconds_count", ())] == processed
    assert s[("retrofit_end_to_end_latency_seconds_sum", ())] > 0
    assert s[("retrofit_ready", ())] == 1
    assert s[("retrofit_fps", ())] > 0
    assert s[("retrofit_last_frame_timestamp_seconds", ())] > time.time() - 60
    info = [k for k in s if k[0] == "retrofit_model_info"][0]
    assert ("model_id", "retrofit-reference-untrained@0.1.0-reference") in info[1]
    assert ("trained", "false") in info[1]
    for counter in (
        "retrofit_frames_dropped_total",
        "retrofit_camera_reconnects_total",
        "retrofit_publish_errors_total",
    ):
        assert (counter, ()) in s


def test_late_subscriber_gets_status(start_agent, subscriber, clip: Path, seeded_bundle: Path):
    agent = start_agent("--camera", str(clip), "--loop", "--realtime", "--bundle", str(seeded_bundle))
    agent.wait_ready()
    time.sleep(1.0)
    sub = subscriber(agent.endpoint, ("status",))
    msgs = receive(sub, 3.0)
    agent.stop()
    assert msgs, "a late joiner must see a status message within a few seconds"
    status = msgs[-1][1]
    validate("status", status)
    assert status["health"] == "ok" and status["trained"] is False and status["frames_processed"] > 0


def test_sigterm_stops_cleanly_without_waiting_for_anything(start_agent, clip: Path, seeded_bundle: Path):
    agent = start_agent("--camera", str(clip), "--loop", "--bundle", str(seeded_bundle))
    agent.wait_ready()
    time.sleep(0.5)
    t0 = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    code = agent.proc.wait(10)  # a liveness bound, not the figure: the 2 s promise is printed
    print(f"SIGTERM to exit: {time.monotonic() - t0:.2f} s")
    assert code == 0
    stopped = [e for e in agent.events() if e["event"] == "agent_stopped"]
    assert stopped and stopped[0]["reason"] == "SIGTERM"


def test_file_source_ends_cleanly_and_max_frames(start_agent, clip: Path, seeded_bundle: Path):
    full = start_agent("--camera", str(clip), "--bundle", str(seeded_bundle))
    assert full.proc.wait(60) == 0
    ended = [e for e in full.events() if e["event"] == "source_finished"]
    assert ended and ended[0]["frames_processed"] == 40

    capped = start_agent("--camera", str(clip), "--bundle", str(seeded_bundle), "--max-frames", "5")
    assert capped.proc.wait(60) == 0
    assert [e for e in capped.events() if e["event"] == "agent_stopped"][0]["frames_processed"] == 5


def test_daemon_logs_that_a_seeded_bundle_is_untrained(start_agent, clip: Path, seeded_bundle: Path):
    agent = start_agent("--camera", str(clip), "--bundle", str(seeded_bundle), "--max-frames", "1")
    assert agent.proc.wait(60) == 0
    warn = [e for e in agent.events() if e["event"] == "bundle_untrained"]
    assert warn and "not meaningful" in warn[0]["notice"] and warn[0]["level"] == "warning"


def test_runs_without_torch(clip: Path, seeded_bundle: Path, tmp_path: Path):
    # run_cli blocks torch/timm/open_clip imports; a full run must still succeed.
    r = run_cli(
        "--camera",
        str(clip),
        "--bundle",
        str(seeded_bundle),
        "--max-frames",
        "3",
        "--publish",
        f"ipc://{tmp_path}/t.sock",
        "--no-metrics",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "max_frames_reached" in r.stderr


# --------------------------------------------------------------------------- bad input


def assert_one_line_exit_2(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_bad_config_exits_2(tmp_path: Path):
    cfg = tmp_path / "a.toml"
    cfg.write_text("[camera]\nfps = 'fast'\n")
    assert_one_line_exit_2(run_cli("--config", str(cfg)), "camera.fps", "'fast'")
    cfg.write_text("[model]\nbundel = 'x'\n")
    assert_one_line_exit_2(run_cli("--config", str(cfg)), "model.bundel: unknown setting")


def test_unknown_flag_exits_2():
    assert_one_line_exit_2(run_cli("--camra", "/dev/video0"), "unrecognized arguments: --camra")


def test_missing_bundle_exits_2(clip: Path, tmp_path: Path):
    r = run_cli(
        "--camera",
        str(clip),
        "--bundle",
        str(tmp_path / "nope"),
        "--no-metrics",
        "--publish",
        f"ipc://{tmp_path}/x.sock",
    )
    assert_one_line_exit_2(r, "bundle directory not found", "nope")


def test_tampered_bundle_exits_2(clip: Path, bundle_copy: Path, tmp_path: Path):
    with open(bundle_copy / "student.int8.onnx", "r+b") as f:
        f.seek(5000)
        f.write(b"\xff\xff")
    r = run_cli(
        "--camera", str(clip), "--bundle", str(bundle_copy), "--no-metrics", "--publish", f"ipc://{tmp_path}/x.sock"
    )
    assert_one_line_exit_2(r, "sha256 mismatch", "student.int8.onnx")


def test_bank_from_other_teacher_exits_2(clip: Path, bundle_copy: Path, tmp_path: Path):
    from retrofit_agent.contract.bundle import load_bank, read_manifest, save_bank, write_manifest

    bank = load_bank(bundle_copy / "bank.npz")
    save_bank(
        bundle_copy / "bank.npz",
        bank.embeddings,
        list(bank.groups),
        list(bank.labels),
        "ViT-L-14/openai",
        "0123456789abcdef",
    )
    write_manifest(bundle_copy, read_manifest(bundle_copy))
    r = run_cli(
        "--camera", str(clip), "--bundle", str(bundle_copy), "--no-metrics", "--publish", f"ipc://{tmp_path}/x.sock"
    )
    assert_one_line_exit_2(r, "ViT-L-14/openai", "rebuild the bank")


def test_missing_video_file_exits_2(seeded_bundle: Path, tmp_path: Path):
    # A file does not appear by waiting (a camera does: tests/daemon/test_camera_life.py).
    r = run_cli(
        "--camera",
        str(tmp_path / "nope.mp4"),
        "--bundle",
        str(seeded_bundle),
        "--no-metrics",
        "--publish",
        f"ipc://{tmp_path}/x.sock",
    )
    assert_one_line_exit_2(r, "nope.mp4")


def test_metrics_port_in_use_exits_2(clip: Path, seeded_bundle: Path, tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli(
            "--camera",
            str(clip),
            "--bundle",
            str(seeded_bundle),
            "--metrics-address",
            f"127.0.0.1:{port}",
            "--publish",
            f"ipc://{tmp_path}/x.sock",
        )
    assert_one_line_exit_2(r, f"127.0.0.1:{port}", "cannot bind")


def test_publish_endpoint_in_use_exits_2(clip: Path, seeded_bundle: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli(
            "--camera",
            str(clip),
            "--bundle",
            str(seeded_bundle),
            "--no-metrics",
            "--publish",
            f"tcp://127.0.0.1:{port}",
        )
    assert_one_line_exit_2(r, "publish endpoint", "cannot bind")
