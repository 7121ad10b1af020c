"""The uplink's input: the daemon's ZeroMQ messages, checked stream by stream.

A stream is (camera, topic) under one ``run_id``. Within a run, ``seq`` must grow by one:
a jump is a gap (messages the daemon's PUB socket dropped for the uplink, or sent while the
uplink was not running): it is first asked of the daemon's replay (:mod:`..replay`), and what
that no longer holds is counted and logged, never invented; ``seq`` at or below the last
one is a duplicate and is dropped; a new ``run_id`` is a daemon restart, not a gap. The last
(run_id, seq) of every stream is journaled with the messages, so a gap that spans an uplink
restart is seen too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.uplink.config import InputConfig

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def topic_level(text: str) -> str:
    """A camera id as one MQTT topic level (no '/', '+', '#')."""
    return _UNSAFE.sub("-", text).strip("-") or "camera"


@dataclass(frozen=True)
class Incoming:
    topic: str
    camera: str
    run_id: str
    seq: int
    vehicle: str
    payload: bytes
    body: dict[str, Any]


@dataclass
class Verdict:
    keep: bool
    duplicate: bool = False
    restart: bool = False
    missing: int = 0  # messages skipped in seq within the same run
    filtered: bool = False


@dataclass
class StreamTracker:
    """Gap, duplicate and restart detection, and the tags filter. Not thread-safe (main loop)."""

    tags_mode: str = "changes"
    tags_every_n: int = 15
    last: dict[str, tuple[str, int]] = field(default_factory=dict)  # stream key -> (run_id, seq)
    changed: dict[str, tuple[str, int]] = field(default_factory=dict)  # updated since the last journal write
    _last_tags: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)  # camera -> (run, tags on)

    def expected(self, msg: Incoming) -> int | None:
        """The seq this stream should go on from if ``msg`` leaves a hole before it, else None:
        the last seq + 1 within the same run, 0 for a new run or a stream never seen."""
        prev = self.last.get(f"{msg.camera}/{msg.topic}")
        start = prev[1] + 1 if prev is not None and prev[0] == msg.run_id else 0
        return start if msg.seq > start else None

    def judge(self, msg: Incoming) -> Verdict:
        key = f"{msg.camera}/{msg.topic}"
        prev = self.last.get(key)
        verdict = Verdict(keep=True)
        if prev is not None and prev[0] == msg.run_id:
            if msg.seq <= prev[1]:
                return Verdict(keep=False, duplicate=True)
            verdict.missing = msg.seq - prev[1] - 1
        elif prev is not None:
            # A new run starts at seq 0; what it published before this message never arrived.
            verdict.restart = True
            verdict.missing = msg.seq
        self.last[key] = self.changed[key] = (msg.run_id, msg.seq)
        if msg.topic == "tags" and not self._keep_tags(msg):
            verdict.keep, verdict.filtered = False, True
        return verdict

    def _keep_tags(self, msg: Incoming) -> bool:
        if self.tags_mode == "all":
            return True
        if self.tags_mode == "every_n":
            return msg.seq % self.tags_every_n == 0
        on = frozenset(f"{t.get('group')}.{t.get('label')}" for t in msg.body.get("tags", []))
        before = self._last_tags.get(msg.camera)
        self._last_tags[msg.camera] = (msg.run_id, on)
        return before is None or before != (msg.run_id, on)

    def take_changed(self) -> dict[str, tuple[str, int]]:
        out, self.changed = self.changed, {}
        return out


def parse(topic: bytes, payload: bytes) -> Incoming | None:
    """A daemon message, or None if it is not one (counted as malformed by the caller)."""
    try:
        body = json.loads(payload)
        return Incoming(
            topic=topic.decode(),
            camera=str(body["camera"]),
            run_id=str(body["run_id"]),
            seq=int(body["seq"]),
            vehicle=str(body.get("vehicle", "")),
            payload=payload,
            body=body,
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


class Source:
    """A SUB socket on the daemon's endpoint (CURVE client when configured)."""

    def __init__(self, cfg: InputConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        from retrofit_agent.daemon.curve import make_curve_client

        self.cfg = cfg
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, cfg.receive_hwm)
        try:
            if cfg.curve_client_cert is not None and cfg.curve_server_key is not None:
                make_curve_client(self.sock, Path(cfg.curve_client_cert), Path(cfg.curve_server_key))
            for t in cfg.topics:
                self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
            self.sock.connect(cfg.endpoint)
        except zmq.ZMQError as e:
            self.sock.close()
            raise ConfigError(
                f"input.endpoint: cannot connect to {cfg.endpoint!r}: {zmq.strerror(e.errno or 0)}"
            ) from None
        except ConfigError:
            self.sock.close()
            raise

    def receive(self, timeout_ms: int, limit: int = 1000) -> list[tuple[bytes, bytes]]:
        """Everything waiting (up to ``limit``), after waiting at most ``timeout_ms`` for the first."""
        out: list[tuple[bytes, bytes]] = []
        if not self.sock.poll(timeout_ms):
            return out
        while len(out) < limit:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(parts) == 2:
                out.append((parts[0], parts[1]))
        return out

    def close(self) -> None:
        self.sock.close()
