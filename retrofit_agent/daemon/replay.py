"""Replay: the daemon keeps its latest messages and hands a missed stretch to a subscriber that asks.

ZeroMQ PUB drops whatever no subscriber is there to take. The uplink is that subscriber, and it
is not always there: it restarts after a crash (about a second), it starts after the daemon at
boot, and a burst can overflow its receive queue. Each of those shows up on its side as a jump
in ``seq``. So the daemon keeps the latest messages of every topic in memory, bounded in bytes
per topic, and serves them on a second socket next to its PUB (the "clone" pattern of the
ZeroMQ guide: updates by PUB, the missing stretch by request).

Protocol: REQ/REP, one JSON request, a multipart reply.

- request ``{"run_id": str, "topic": str, "from_seq": int, "to_seq": int}`` (``to_seq`` exclusive);
- reply ``[header, payload, ...]``: the header is ``{"run_id": str, "first_held": int | null,
  "count": int, "more": bool}`` and the payloads are the messages' bytes, exactly as published,
  in ``seq`` order. Nothing comes back for another ``run_id``: that run ended with its process.
  ``more`` says the reply was cut at ``MAX_REPLY_BYTES``; ask again from the last ``seq`` + 1.

The endpoint is the publish endpoint's sibling (:func:`replay_endpoint_for`) unless set, and it
takes the same CURVE keys: a subscriber refused on PUB is refused here too.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import structlog
import zmq
from pydantic import BaseModel, Field, ValidationError

log = structlog.get_logger("retrofit_agent.daemon.replay")

MAX_REPLY_BYTES = 4 * 1024 * 1024
ITEM_OVERHEAD = 100  # bytes a held message costs beyond its payload (bytes object, tuple, deque slot)


def replay_endpoint_for(endpoint: str) -> str:
    """The replay socket's default address: the next TCP port, or the IPC path plus ``.replay``."""
    if endpoint.startswith("ipc://"):
        return endpoint + ".replay"
    host, _, port = endpoint.rpartition(":")
    if not port.isdigit() or int(port) >= 65535:
        raise ValueError(f"cannot derive a replay endpoint from {endpoint!r}; set it explicitly")
    return f"{host}:{int(port) + 1}"


@dataclass
class _Topic:
    items: deque[tuple[int, bytes]] = field(default_factory=deque)
    bytes: int = 0


class ReplayRing:
    """The latest messages of each topic, oldest dropped first past ``max_bytes_per_topic``.

    Bounded per topic so that a chatty topic (tags, every frame) never pushes out a rare one
    (events, captures). Thread-safe: the frame loop adds, the replay thread reads.
    """

    def __init__(self, max_bytes_per_topic: int) -> None:
        self.max_bytes = max_bytes_per_topic
        self._topics: dict[str, _Topic] = {}
        self._lock = threading.Lock()

    def add(self, topic: str, seq: int, payload: bytes) -> None:
        with self._lock:
            t = self._topics.setdefault(topic, _Topic())
            if t.items and seq != t.items[-1][0] + 1:
                t.items.clear()  # seq only grows by one in a run; anything else starts afresh
                t.bytes = 0
            t.items.append((seq, payload))
            t.bytes += len(payload) + ITEM_OVERHEAD
            while t.bytes > self.max_bytes and len(t.items) > 1:
                t.bytes -= len(t.items.popleft()[1]) + ITEM_OVERHEAD

    def take(self, topic: str, from_seq: int, to_seq: int, max_bytes: int) -> tuple[int | None, list[bytes], bool]:
        """(first seq held, payloads with ``from_seq <= seq < to_seq``, cut short by ``max_bytes``)."""
        with self._lock:
            t = self._topics.get(topic)
            if t is None or not t.items:
                return None, [], False
            first = t.items[0][0]
            start = max(from_seq, first) - first
            stop = max(0, to_seq - first)
            chosen = list(islice(t.items, start, stop))
        out: list[bytes] = []
        size = 0
        for _, payload in chosen:
            if out and size + len(payload) > max_bytes:
                return first, out, True
            out.append(payload)
            size += len(payload)
        return first, out, False

    def held(self) -> dict[str, tuple[int, int, int]]:
        """topic -> (first seq, last seq, bytes): for metrics and tests."""
        with self._lock:
            return {k: (t.items[0][0], t.items[-1][0], t.bytes) for k, t in self._topics.items() if t.items}


class ReplayRequest(BaseModel):
    run_id: str = Field(min_length=1, max_length=64)
    topic: str = Field(min_length=1, max_length=32)
    from_seq: int = Field(ge=0)
    to_seq: int = Field(ge=0)


class ReplayServer:
    """A REP socket on its own thread; ``start`` binds (a taken address fails at once)."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        ring: ReplayRing,
        run_id: str,
        curve_keys: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.ring, self.run_id = ring, run_id
        self.served = 0
        self._stop = threading.Event()
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, 1000)
        if curve_keys is not None:
            self.socket.curve_publickey, self.socket.curve_secretkey = curve_keys
            self.socket.curve_server = True
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError:
            self.socket.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._serve, name="replay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.socket.poll(200):
                    continue
                raw = self.socket.recv()
                self.socket.send_multipart(self._answer(raw))
                self.served += 1
            except zmq.ZMQError as e:
                if self._stop.is_set():
                    return
                log.warning("replay_socket_error", error=e.strerror)
                time.sleep(0.2)
        self.socket.close()

    def _answer(self, raw: bytes) -> list[bytes]:
        try:
            req = ReplayRequest.model_validate_json(raw)
        except ValidationError:
            return [json.dumps({"error": "bad request"}).encode()]
        if req.run_id != self.run_id:
            header = {"run_id": self.run_id, "first_held": None, "count": 0, "more": False}
            return [json.dumps(header).encode()]
        first, payloads, more = self.ring.take(req.topic, req.from_seq, req.to_seq, MAX_REPLY_BYTES)
        header = {"run_id": self.run_id, "first_held": first, "count": len(payloads), "more": more}
        return [json.dumps(header).encode(), *payloads]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        else:
            self.socket.close()


@dataclass
class Replayed:
    run_id: str  # the daemon's current run
    first_held: int | None
    payloads: list[bytes]


class ReplayClient:
    """Asks the daemon for a missed stretch. After a failed ask (no daemon, an old daemon without
    replay) it waits ``backoff_s`` before asking again, so a gap costs at most one timeout."""

    def __init__(
        self,
        endpoint: str,
        timeout_ms: int = 1000,
        backoff_s: float = 10.0,
        curve: tuple[Path, Path] | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.endpoint, self.timeout_ms, self.backoff_s, self.curve = endpoint, timeout_ms, backoff_s, curve
        self._ctx = context or zmq.Context.instance()
        self._quiet_until = 0.0

    def fetch(self, run_id: str, topic: str, from_seq: int, to_seq: int) -> Replayed | None:
        """Everything held of ``[from_seq, to_seq)``, across as many replies as it takes; None when
        the daemon did not answer."""
        if time.monotonic() < self._quiet_until:
            return None
        out = Replayed(run_id="", first_held=None, payloads=[])
        start = from_seq
        while start < to_seq:
            reply = self._ask(ReplayRequest(run_id=run_id, topic=topic, from_seq=start, to_seq=to_seq))
            if reply is None:
                self._quiet_until = time.monotonic() + self.backoff_s
                return None if not out.payloads else out
            header, payloads = reply
            if out.first_held is None:
                held = header.get("first_held")
                out.run_id, out.first_held = str(header.get("run_id", "")), held if isinstance(held, int) else None
            out.payloads.extend(payloads)
            if not header.get("more") or not payloads:
                break
            first = out.first_held if isinstance(out.first_held, int) else from_seq
            start = max(from_seq, first) + len(out.payloads)  # payloads are consecutive from there
        return out

    def _ask(self, req: ReplayRequest) -> tuple[dict[str, object], list[bytes]] | None:
        # A fresh REQ socket per ask: a REQ whose reply never came cannot send again.
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.curve is not None:
                from retrofit_agent.daemon.curve import make_curve_client

                make_curve_client(sock, *self.curve)
            sock.connect(self.endpoint)
            sock.send(req.model_dump_json().encode())
            if not sock.poll(self.timeout_ms):
                return None
            parts = sock.recv_multipart()
            header = json.loads(parts[0])
            if not isinstance(header, dict) or "error" in header:
                return None
            return header, parts[1:]
        except (zmq.ZMQError, ValueError):
            return None
        finally:
            sock.close()
