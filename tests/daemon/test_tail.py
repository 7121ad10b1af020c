import io
import threading
import time

import pytest
import zmq

from retrofit_agent.contract.messages import Latency, StatusMessage, TagOut, TagsMessage
from retrofit_agent.daemon.tail import TailOptions, tail


@pytest.mark.integration
def test_tail_prints_messages_from_a_real_publisher(tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)
    out = io.StringIO()
    result = {}
    opts = TailOptions(endpoint, ("tags", "status"), count=2, timeout_s=10)
    t = threading.Thread(target=lambda: result.setdefault("code", tail(opts, out, io.StringIO())))
    t.start()
    lat = Latency(capture_wait_ms=1, preprocess_ms=1, inference_ms=30, labelling_ms=0.1, end_to_end_ms=33.3)
    ids = {"run_id": "r1", "vehicle": "car-1"}
    tags = TagsMessage(
        **ids,
        seq=7,
        frame_id=7,
        camera="front",
        captured_at="2026-01-01T00:00:00.000Z",
        model="m@1",
        tags=[TagOut(group="weather", label="rain", score=0.8)],
        top=[],
        latency=lat,
    )
    status = StatusMessage(
        **ids,
        seq=0,
        at="2026-01-01T00:00:00.000Z",
        camera="front",
        model="m@1",
        trained=False,
        health="ok",
        machine="aarch64",
        frames_processed=8,
        fps=30.0,
        tags=[],
    )
    deadline = time.monotonic() + 10
    while t.is_alive() and time.monotonic() < deadline:  # PUB drops until the SUB has joined
        pub.send_multipart([b"tags", tags.model_dump_json().encode()])
        pub.send_multipart([b"status", status.model_dump_json().encode()])
        time.sleep(0.1)
    t.join(5)
    pub.close(0)
    ctx.term()
    lines = out.getvalue().splitlines()
    assert result["code"] == 0 and len(lines) == 2
    assert lines[0] == "tags   seq=7 frame=7 e2e=33.3ms on: weather.rain=0.80"
    assert lines[1].startswith("status ok model=m@1 trained=False machine=aarch64")


# --------------------------------------------------------------------------- what tail says


def _tags(seq: int, on: list[tuple[str, str]], top: list[tuple[str, str]]) -> TagsMessage:
    lat = Latency(capture_wait_ms=1, preprocess_ms=1, inference_ms=30, labelling_ms=0.1, end_to_end_ms=33.3)
    return TagsMessage(
        run_id="r1",
        vehicle="car-1",
        seq=seq,
        frame_id=seq,
        camera="front",
        captured_at="2026-01-01T00:00:00.000Z",
        model="m@1",
        tags=[TagOut(group=g, label=l, score=0.8) for g, l in on],
        top=[TagOut(group=g, label=l, score=0.8) for g, l in top],
        latency=lat,
    )


def test_tail_says_what_it_waits_for_then_once_that_nothing_arrives_then_why_it_stopped(tmp_path):
    endpoint = f"ipc://{tmp_path}/silent.sock"
    out, err = io.StringIO(), io.StringIO()
    code = tail(TailOptions(endpoint, ("tags",), timeout_s=1.2, quiet_notice_s=0.3), out, err)
    assert code == 1 and out.getvalue() == ""
    lines = err.getvalue().splitlines()
    assert lines == [
        f"retrofit-agent tail: waiting for messages from {endpoint} (topics: tags)",
        f"retrofit-agent tail: no messages from {endpoint} in 0.3 s; is retrofit-agent running and publishing "
        "there? (still waiting)",
        f"retrofit-agent tail: error: no messages from {endpoint} in 1.2 s (--timeout); is retrofit-agent "
        "running and publishing there?",
    ]


@pytest.mark.integration
def test_tail_cli_timeout_is_non_zero_with_a_one_line_reason(tmp_path):
    from helpers import run_cli

    r = run_cli("tail", "--endpoint", f"ipc://{tmp_path}/none.sock", "--timeout", "0.5")
    assert r.returncode == 1 and r.stdout == ""
    waiting, reason = r.stderr.strip().splitlines()
    assert waiting.startswith("retrofit-agent tail: waiting for messages from ipc://")
    assert reason.startswith("retrofit-agent tail: error: no messages from ipc://") and "(--timeout)" in reason


def _publish_until_done(endpoint: str, messages: list, done) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)
    deadline = time.monotonic() + 10
    sent = False
    while not done() and time.monotonic() < deadline:
        time.sleep(0.3)  # PUB drops until the SUB has joined; send the batch once it surely has
        if not sent:
            for m in messages:
                pub.send_multipart([m.topic.encode(), m.model_dump_json().encode()])
            sent = True
    pub.close(0)
    ctx.term()


def test_summary_counts_per_group_how_often_each_label_was_top_and_on(tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    msgs = [
        _tags(0, on=[("weather", "rain")], top=[("weather", "rain"), ("scene", "tunnel")]),
        _tags(1, on=[("weather", "rain")], top=[("weather", "rain"), ("scene", "open_road")]),
        _tags(2, on=[], top=[("weather", "clear"), ("scene", "open_road")]),
    ]
    out, err = io.StringIO(), io.StringIO()
    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "code", tail(TailOptions(endpoint, ("tags",), count=3, timeout_s=10, summary=True), out, err)
        )
    )
    t.start()
    _publish_until_done(endpoint, msgs, lambda: not t.is_alive())
    t.join(5)
    assert result["code"] == 0
    lines = out.getvalue().splitlines()
    summary = lines[lines.index("summary: 3 frames from m@1") :]
    rows = [line.split() for line in summary[2:]]
    assert rows == [
        ["scene", "open_road", "2", "0"],
        ["tunnel", "1", "0"],
        ["weather", "rain", "2", "2"],
        ["clear", "1", "0"],
    ]


@pytest.mark.integration
def test_sigterm_ends_tail_with_its_summary(tmp_path):
    """The demo stops its background tail with SIGTERM (background jobs ignore Ctrl-C)."""
    import select
    import signal
    import subprocess

    from helpers import REPO, agent_command

    endpoint = f"ipc://{tmp_path}/pub.sock"
    proc = subprocess.Popen(
        agent_command("tail", "--endpoint", endpoint, "--summary", "--topic", "tags"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)
    msg = _tags(0, on=[("weather", "rain")], top=[("weather", "rain")])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until tail printed a message
            pub.send_multipart([b"tags", msg.model_dump_json().encode()])
            if select.select([proc.stdout], [], [], 0.1)[0]:
                break
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        pub.close(0)
        ctx.term()
    assert first.startswith("tags   seq=0")
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "summary: " in out and "weather" in out.split("summary: ", 1)[1]


def test_legend_reads_trained_and_notice_from_the_manifest(seeded_bundle):
    from retrofit_agent.contract.bundle import read_manifest
    from retrofit_agent.daemon.tail import legend

    m = read_manifest(seeded_bundle)
    untrained = "\n".join(legend(m, seeded_bundle))
    assert "UNTRAINED" in untrained and m.notice in untrained
    trained = "\n".join(legend(m.model_copy(update={"trained": True, "notice": ""}), seeded_bundle))
    assert f"{m.model_id}, trained" in trained and "UNTRAINED" not in trained
    for g in m.bank.groups:
        assert any(line.split()[0] == g.name for line in trained.splitlines() if line.startswith("  "))
