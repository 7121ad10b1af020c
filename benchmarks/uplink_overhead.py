"""The uplink's cost and drain speed, measured in one run on this machine (figures, never a verdict).

1. CPU: the daemon alone on the sample clip at its 15 fps (--realtime --loop), then the daemon
   with the uplink (tags = changes) forwarding to Debian's mosquitto; the uplink's CPU seconds
   as a ratio of the daemon's, and as a share of the whole vehicle (all cores).
2. Drain: a journal holding one hour of a 15 fps camera's messages with tags = all (54 000
   tags + 1 800 status), forwarded to mosquitto once it is reachable, while live events keep
   arriving once a second: drain time, and each live event's delay during the drain.

    .venv/bin/python benchmarks/uplink_overhead.py --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests/daemon/uplink")]

from uplink_helpers import Broker, Consumer, Uplink, wait_until  # noqa: E402

from helpers import agent_command, free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def daemon(tmp: Path, endpoint: str) -> subprocess.Popen:
    return subprocess.Popen(
        agent_command(
            "--camera",
            str(REPO / "models/sample/drive.mp4"),
            "--loop",
            "--realtime",
            "--threads",
            "2",
            "--publish",
            endpoint,
            "--metrics-address",
            f"127.0.0.1:{free_port()}",
            "--log-format",
            "json",
        ),
        stdout=open(tmp / "daemon.log", "ab"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "RETROFIT_PUBLISH__VEHICLE": "bench"},
    )


def measure_cpu(tmp: Path, seconds: float, broker: Broker) -> dict:
    endpoint = f"ipc://{tmp}/bench.sock"
    d = daemon(tmp, endpoint)
    time.sleep(8)  # model load and warm-up
    d0, t0 = cpu_seconds(d.pid), time.monotonic()
    time.sleep(seconds)
    alone = (cpu_seconds(d.pid) - d0) / (time.monotonic() - t0)
    u = Uplink(
        tmp,
        [
            "--endpoint",
            endpoint,
            "--mqtt",
            f"mqtt://127.0.0.1:{broker.port}",
            "--journal",
            str(tmp / "j-cpu"),
            "--vehicle",
            "bench",
            "--tags",
            "changes",
        ],
        name="uplink-cpu",
    ).start()
    u.wait_ready()
    time.sleep(3)
    d0, u0, t0 = cpu_seconds(d.pid), cpu_seconds(u.proc.pid), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    with_uplink = (cpu_seconds(d.pid) - d0) / elapsed
    uplink = (cpu_seconds(u.proc.pid) - u0) / elapsed
    forwarded = u.metric("retrofit_uplink_forwarded_total")
    u.stop()
    d.terminate()
    d.wait(10)
    cores = os.cpu_count() or 1
    return {
        "daemon_alone_cores": round(alone, 3),
        "daemon_with_uplink_cores": round(with_uplink, 3),
        "uplink_cores": round(uplink, 4),
        "uplink_over_daemon": round(uplink / alone, 4),
        "uplink_share_of_vehicle": round(uplink / cores, 4),
        "cores": cores,
        "messages_forwarded": int(forwarded),
    }


def measure_drain(tmp: Path, broker: Broker) -> dict:
    import zmq

    from retrofit_agent.daemon.uplink.journal import Journal

    jdir = tmp / "j-drain"
    journal = Journal(jdir, max_bytes=1024**3, max_age_s=86400)
    tags = json.dumps(
        {
            "topic": "tags",
            "schema_version": 2,
            "run_id": "r0",
            "vehicle": "bench",
            "camera": "front",
            "seq": 0,
            "frame_id": 0,
            "captured_at": "2026-11-29T12:00:00.000Z",
            "model": "m@1",
            "tags": [{"group": "weather", "label": "rain", "score": 0.7}],
            "top": [{"group": g, "label": "x", "score": 0.5} for g in range(8)],
            "latency": {
                "capture_wait_ms": 1,
                "preprocess_ms": 2,
                "inference_ms": 60,
                "labelling_ms": 0.3,
                "end_to_end_ms": 64,
            },
        }
    ).encode()
    rows = [("retrofit/bench/front/tags", tags)] * 54000 + [("retrofit/bench/front/status", tags[:400])] * 1800
    for i in range(0, len(rows), 5000):
        journal.append(rows[i : i + 5000], {})
    backlog_bytes = journal.bytes
    journal.close()
    consumer = Consumer(broker.port, client_id="bench-drain").start()
    wait_until(lambda: consumer.client.is_connected(), 10, "consumer")
    endpoint = f"ipc://{tmp}/live.sock"
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(endpoint)
    u = Uplink(
        tmp,
        [
            "--endpoint",
            endpoint,
            "--mqtt",
            f"mqtt://127.0.0.1:{broker.port}",
            "--journal",
            str(jdir),
            "--vehicle",
            "bench",
            "--tags",
            "all",
        ],
        name="uplink-drain",
    ).start()
    u.wait_ready()
    t0 = time.monotonic()
    sent: dict[int, float] = {}
    seq = 0
    while u.metric("retrofit_uplink_backlog_messages") > 1 or seq < 3:
        body = {
            "topic": "events",
            "schema_version": 2,
            "run_id": "live",
            "vehicle": "bench",
            "camera": "front",
            "seq": seq,
            "frame_id": seq,
            "at": "x",
            "model": "m",
            "event": "tag_on",
            "tag": {"group": "g", "label": "l", "score": 1.0},
        }
        pub.send_multipart([b"events", json.dumps(body).encode()])
        sent[seq] = time.monotonic()
        seq += 1
        time.sleep(1.0)
        if time.monotonic() - t0 > 600:
            break
    drain = time.monotonic() - t0
    time.sleep(1)
    arrived = {json.loads(p)["seq"]: t for topic, p, t in consumer.messages if topic.endswith("/events")}
    delays = [arrived[s] - sent[s] for s in sent if s in arrived]
    u.stop()
    consumer.stop()
    pub.close(0)
    return {
        "backlog_messages": len(rows),
        "backlog_mb": round(backlog_bytes / 1e6, 1),
        "drain_s": round(drain, 1),
        "live_events_sent_during_drain": len(sent),
        "live_events_delivered": len(delays),
        "live_event_delay_max_s": round(max(delays), 3) if delays else None,
        "uplink_log_drain_s": [e.get("seconds") for e in u.events() if e.get("event") == "backlog_drained"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    a = ap.parse_args()
    with TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Broker(tmp / "broker").start()
        try:
            print(json.dumps({"cpu": measure_cpu(tmp, a.seconds, broker)}), flush=True)
            print(json.dumps({"drain": measure_drain(tmp, broker)}), flush=True)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
