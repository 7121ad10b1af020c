"""From the journal to the broker: per-stream order, a bounded in-flight window, deletion
only after PUBACK, and a backlog that cannot starve live messages.

A stream is one MQTT topic (``<prefix>/<vehicle>/<camera>/<topic>``); its rows go out in id
order, so order per topic holds. Streams take turns, one message each (events first), so a
long tags backlog never holds back an event. Rows journaled before the current connection
came up are the *backlog*: they spend tokens from a bucket (``mqtt.backlog_rate`` per second),
while live rows of a stream whose backlog is drained go straight out.

paho re-sends unacknowledged messages after a reconnect by itself, keeping their message
ids, so the in-flight map survives a broker outage; after a crash of the uplink every row
still in the journal is published again (counted as ``resent`` duplicates when it had been
sent before the crash; the consumer drops them by key).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from retrofit_agent.daemon.uplink.journal import Dropped, Journal, Row
from retrofit_agent.daemon.uplink.metrics import UplinkMetrics

log = structlog.get_logger("retrofit_agent.daemon.uplink.forwarder")
PRIORITY = ("events", "captures", "status", "tags")


class Link(Protocol):
    generation: int

    def is_connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int | None: ...

    def take_acks(self) -> list[tuple[int, bool]]: ...


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, max(burst, 1.0), clock
        self.tokens = self.burst
        self._at = clock()

    def take(self, n: float = 1.0) -> bool:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


@dataclass
class _Flight:
    row_id: int
    stream: str
    topic: str


def _topic_of(stream: str) -> str:
    return stream.rsplit("/", 1)[-1]


class Forwarder:
    def __init__(
        self,
        journal: Journal,
        link: Link,
        metrics: UplinkMetrics,
        window: int,
        backlog_rate: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.journal = journal
        self.link = link
        self.metrics = metrics
        self.window = window
        self.bucket = TokenBucket(backlog_rate, backlog_rate / 10, clock)
        self.cursor: dict[str, int] = {}  # stream -> last id handed to the link
        self.buffer: dict[str, deque[Row]] = {}
        self.caught_up: set[str] = set()  # streams whose journal rows are all in the buffer
        self.inflight: dict[int, _Flight] = {}
        self.live_from = journal.max_id()  # rows up to here are backlog
        self.sent_high = int(journal.get_meta("sent_high") or 0)  # highest id published, as of the last ack
        self._resend_below = self.sent_high  # rows up to here may have reached the broker before a crash
        self._generation = -1
        self.drain_started: float | None = None
        for stream in journal.streams():
            self._add(stream)

    def _add(self, stream: str) -> None:
        if stream not in self.cursor:
            self.cursor[stream] = 0
            self.buffer[stream] = deque()
            order = {t: i for i, t in enumerate(PRIORITY)}
            self.cursor = dict(sorted(self.cursor.items(), key=lambda kv: order.get(_topic_of(kv[0]), 9)))

    def appended(self, rows: list[Row]) -> None:
        """Rows just journaled: a stream that has caught up takes them from memory, not the database."""
        for row in rows:
            self._add(row.stream)
            if row.stream in self.caught_up:
                buf = self.buffer[row.stream]
                if len(buf) < 256:
                    buf.append(row)
                else:  # an outage: memory stays bounded, the rest is read back from the journal in order
                    self.caught_up.discard(row.stream)

    def dropped(self, drops: dict[str, Dropped]) -> None:
        """Rows a journal bound removed are not sent any more (oldest first, so an id cut-off)."""
        last = max(d.last_id for d in drops.values())
        for stream, buf in self.buffer.items():
            while buf and buf[0].id <= last:
                buf.popleft()
            self.cursor[stream] = max(self.cursor[stream], last) if not buf else self.cursor[stream]

    # ------------------------------------------------------------------ the main loop's turn

    def pump(self) -> int:
        """Process PUBACKs (delete their rows), then publish what the window and bucket allow.
        Returns the number of messages published."""
        self._acks()
        if not self.link.is_connected():
            return 0
        if self.link.generation != self._generation:
            self._generation = self.link.generation
            self.live_from = self.journal.max_id()
            if self.journal.count:
                self.drain_started = time.monotonic()
                log.info("backlog_draining", messages=self.journal.count, bytes=self.journal.bytes)
        sent = 0
        progress = True
        while progress and len(self.inflight) < self.window:
            progress = False
            for stream in self.cursor:
                if len(self.inflight) >= self.window:
                    break
                row = self._peek(stream)
                if row is None or (row.id <= self.live_from and not self.bucket.take()):
                    continue
                mid = self.link.publish(stream, row.payload)
                if mid is None:
                    return sent
                self.buffer[stream].popleft()
                self.cursor[stream] = row.id
                self.inflight[mid] = _Flight(row.id, stream, _topic_of(stream))
                if row.id <= self._resend_below:
                    self.metrics.duplicates.labels(kind="resent").inc()
                sent += 1
                progress = True
        return sent

    def _peek(self, stream: str) -> Row | None:
        buf = self.buffer[stream]
        if not buf and stream not in self.caught_up:
            rows = self.journal.next_rows(stream, self.cursor[stream])
            buf.extend(rows)
            if len(rows) < 256:
                self.caught_up.add(stream)
        return buf[0] if buf else None

    def _acks(self) -> None:
        done: list[int] = []
        for mid, failed in self.link.take_acks():
            flight = self.inflight.pop(mid, None)
            if flight is None:
                continue  # availability or a capture sent by the uploader thread
            done.append(flight.row_id)
            if failed:
                self.metrics.dropped.labels(reason="rejected").inc()
                log.error("mqtt_message_rejected", stream=flight.stream, row=flight.row_id)
            else:
                self.metrics.forwarded.labels(topic=flight.topic).inc()
        if done:
            self.sent_high = max(self.sent_high, max(done))
            self.journal.delete(done, sent_high=self.sent_high)
        if self.drain_started is not None and self.live_from and not self._backlog_left():
            log.info("backlog_drained", seconds=round(time.monotonic() - self.drain_started, 2))
            self.drain_started = None

    def _backlog_left(self) -> bool:
        return any(f.row_id <= self.live_from for f in self.inflight.values()) or any(
            (buf and buf[0].id <= self.live_from) or (not buf and s not in self.caught_up)
            for s, buf in self.buffer.items()
        )
