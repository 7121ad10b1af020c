"""``retrofit-agent tail``: subscribe to a running daemon and print what it publishes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

import zmq

from retrofit_agent.daemon.curve import make_curve_client

from retrofit_agent.contract.messages import TOPICS


def format_message(topic: str, msg: dict) -> str:
    if topic == "tags":
        tags = " ".join(f"{t['group']}.{t['label']}={t['score']:.2f}" for t in msg["tags"]) or "-"
        return f"tags   seq={msg['seq']} frame={msg['frame_id']} e2e={msg['latency']['end_to_end_ms']:.1f}ms on: {tags}"
    if topic == "events":
        t = msg["tag"]
        return f"event  seq={msg['seq']} frame={msg['frame_id']} {msg['event']} {t['group']}.{t['label']} ({t['score']:.2f})"
    if topic == "status":
        return (
            f"status {msg['health']} model={msg['model']} trained={msg['trained']} machine={msg['machine']} "
            f"frames={msg['frames_processed']} fps={msg['fps']}"
        )
    if topic == "captures":
        return f"saved  seq={msg['seq']} {msg['campaign']} {msg['role']}{msg['offset']:+d} frame={msg['frame_id']} {msg['path']}"
    return f"{topic} {json.dumps(msg)}"


def tail(
    endpoint: str,
    topics: list[str],
    count: int | None,
    timeout: float | None,
    raw: bool,
    out: TextIO = sys.stdout,
    curve: tuple[Path, Path] | None = None,
) -> int:
    """Print messages until ``count`` were shown or ``timeout`` seconds passed. Returns an exit code.

    ``curve`` is (this client's secret certificate, the daemon's public certificate).
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        make_curve_client(sock, *curve)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    sock.connect(endpoint)
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0
    try:
        while count is None or shown < count:
            wait_ms = 250 if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
            if deadline is not None and wait_ms == 0:
                break
            if not sock.poll(min(wait_ms, 250)):
                continue
            topic_b, payload = sock.recv_multipart()
            topic = topic_b.decode()
            line = payload.decode() if raw else format_message(topic, json.loads(payload))
            out.write(line + "\n")
            out.flush()
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0 if shown or count == 0 else 1


__all__ = ["tail", "format_message", "TOPICS"]
