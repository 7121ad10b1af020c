"""The uplink's composition root: refuse what waiting cannot fix (journal, TLS files, the
object store's secret), then journal, metrics, broker link, capture uploader, input; READY;
then the loop.

One turn of the loop: take what the daemon sent (waiting at most 50 ms), judge each message
(gaps, duplicates, restarts, the tags filter), append the kept ones to the journal in one
transaction, and only then let the forwarder publish; PUBACKs delete rows on the next turn.
Once a second: the journal's bounds, the gauges, the watchdog.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry

from retrofit_agent import __version__
from retrofit_agent.contract.messages import host_vehicle_id
from retrofit_agent.daemon.lifecycle import StopSignal, SystemdNotifier
from retrofit_agent.daemon.metrics import serve_metrics
from retrofit_agent.daemon.replay import ReplayClient
from retrofit_agent.daemon.uplink.config import UplinkConfig, read_secret
from retrofit_agent.daemon.uplink.forwarder import Forwarder
from retrofit_agent.daemon.uplink.journal import Journal, Row
from retrofit_agent.daemon.uplink.metrics import UplinkMetrics
from retrofit_agent.daemon.uplink.mqtt import Link
from retrofit_agent.daemon.uplink.s3 import S3Client, Throttle
from retrofit_agent.daemon.uplink.source import Incoming, Source, StreamTracker, parse, topic_level
from retrofit_agent.daemon.uplink.uploader import CaptureUploader, open_state_db

log = structlog.get_logger("retrofit_agent.daemon.uplink")
HOUSEKEEPING_S = 1.0


def run_uplink(cfg: UplinkConfig) -> int:
    """Wire the uplink and run it until SIGTERM/SIGINT; returns the exit code. Raises RetrofitError."""
    vehicle = cfg.vehicle or host_vehicle_id()
    log.info(
        "uplink_starting",
        version=__version__,
        vehicle=vehicle,
        endpoint=cfg.input.endpoint,
        broker=cfg.mqtt.url,
        journal=str(cfg.journal.directory),
    )
    stop = StopSignal()
    stop.install()
    notifier = SystemdNotifier()
    metrics = UplinkMetrics.create(CollectorRegistry(auto_describe=True))
    with ExitStack() as stack:
        stack.callback(notifier.close)
        journal = Journal(
            Path(cfg.journal.directory), cfg.journal.max_bytes, cfg.journal.max_age_s, cfg.journal.synchronous
        )
        stack.callback(journal.close)
        link = Link(cfg.mqtt, vehicle, metrics)  # TLS files and the password file are read here
        s3 = _s3_client(cfg, stop.event)
        if cfg.metrics.enabled:
            server, _ = serve_metrics(metrics.registry, cfg.metrics.host, cfg.metrics.port)
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            log.info("metrics_serving", address=f"{cfg.metrics.host}:{server.server_port}")
        log.info("journal_opened", messages=journal.count, bytes=journal.bytes, synchronous=cfg.journal.synchronous)
        link.start()
        stack.callback(link.stop)
        uploader = None
        if cfg.captures.directory is not None:
            uploader = CaptureUploader(
                cfg.captures,
                cfg.s3,
                s3,
                vehicle,
                open_state_db(Path(cfg.journal.directory)),
                None if s3 is not None else link,
                cfg.mqtt.topic_prefix,
                metrics,
                stop.event,
            )
            uploader.start()
            stack.callback(uploader.join, 5.0)
        source = Source(cfg.input)
        stack.callback(source.close)
        loop = UplinkLoop(
            cfg,
            vehicle,
            journal,
            Forwarder(journal, link, metrics, cfg.mqtt.inflight, cfg.mqtt.backlog_rate),
            metrics,
            uploader,
            _replay_client(cfg),
        )
        notifier.ready(f"forwarding {cfg.input.endpoint} to {cfg.mqtt.host}:{cfg.mqtt.port}")
        log.info("uplink_ready", vehicle=vehicle)
        while not stop.is_set():
            loop.turn(source.receive(50))
            notifier.watchdog()
        notifier.stopping()
        loop.forwarder.pump()  # last PUBACKs into the journal
        log.info("uplink_stopped", reason=stop.reason, backlog=journal.count)
    return 0


def _replay_client(cfg: UplinkConfig) -> ReplayClient | None:
    i = cfg.input
    if not i.replay:
        return None
    curve = None
    if i.curve_client_cert is not None and i.curve_server_key is not None:
        curve = (Path(i.curve_client_cert), Path(i.curve_server_key))
    return ReplayClient(i.replay_address, i.replay_timeout_ms, curve=curve)


def _s3_client(cfg: UplinkConfig, stop: threading.Event) -> S3Client | None:
    if cfg.s3 is None or cfg.captures.directory is None:
        return None
    s = cfg.s3
    secret = (
        read_secret(
            s.secret_access_key,
            Path(s.secret_access_key_file) if s.secret_access_key_file else None,
            "s3.secret_access_key_file",
        )
        or ""
    )
    return S3Client(
        s.endpoint,
        s.bucket,
        s.region,
        s.access_key_id,
        secret,
        s.timeout_s,
        Throttle(cfg.captures.max_bytes_per_s, stop),
    )


class UplinkLoop:
    """The main loop's work, one turn at a time (tests drive it directly)."""

    def __init__(
        self,
        cfg: UplinkConfig,
        vehicle: str,
        journal: Journal,
        forwarder: Forwarder,
        metrics: UplinkMetrics,
        uploader: CaptureUploader | None,
        replay: ReplayClient | None = None,
    ) -> None:
        self.cfg, self.vehicle, self.journal, self.forwarder = cfg, vehicle, journal, forwarder
        self.metrics, self.uploader, self.replay = metrics, uploader, replay
        self.tracker = StreamTracker(cfg.input.tags, cfg.input.tags_every_n, last=journal.input_streams())
        self._housekeeping_at = 0.0
        self._vehicle_warned = False

    def turn(self, received: list[tuple[bytes, bytes]]) -> None:
        rows: list[tuple[str, bytes]] = []
        topics: list[str] = []
        for topic, payload in received:
            msg = parse(topic, payload)
            if msg is None:
                self.metrics.dropped.labels(reason="malformed").inc()
                continue
            self.metrics.received.labels(topic=msg.topic).inc()
            start = self.tracker.expected(msg)
            if start is not None and self.replay is not None:
                self._fill(msg, start, rows, topics)
            self._judge(msg, rows, topics)
        if rows or self.tracker.changed:
            ids = self.journal.append(rows, self.tracker.take_changed())  # before anything else
            for name in topics:
                self.metrics.journaled.labels(topic=name).inc()
            self.forwarder.appended([Row(i, stream, body) for (stream, body), i in zip(rows, ids)])
            if self.uploader is not None and "captures" in topics:
                self.uploader.wake()
        self.forwarder.pump()
        now = time.monotonic()
        if now >= self._housekeeping_at or self.journal.bytes > self.journal.max_bytes:
            self._housekeeping_at = now + HOUSEKEEPING_S
            self.housekeeping()

    def _fill(self, msg: Incoming, start: int, rows: list[tuple[str, bytes]], topics: list[str]) -> None:
        """Ask the daemon for the stretch [start, msg.seq) of msg's stream and take it in order, before
        msg; what it no longer holds stays a gap for _judge to count."""
        assert self.replay is not None
        got = self.replay.fetch(msg.run_id, msg.topic, start, msg.seq)
        if got is None:
            self.metrics.replay_failures.inc()
            return
        taken = 0
        for payload in got.payloads:
            old = parse(msg.topic.encode(), payload)
            if old is None or old.run_id != msg.run_id or old.camera != msg.camera or old.seq >= msg.seq:
                continue
            taken += 1
            self.metrics.replayed.labels(topic=msg.topic).inc()
            self._judge(old, rows, topics)
        log.info(
            "replayed",
            camera=msg.camera,
            topic=msg.topic,
            run_id=msg.run_id,
            from_seq=start,
            to_seq=msg.seq,
            messages=taken,
            first_held=got.first_held,
        )

    def _judge(self, msg: Incoming, rows: list[tuple[str, bytes]], topics: list[str]) -> None:
        verdict = self.tracker.judge(msg)
        if verdict.duplicate:
            self.metrics.duplicates.labels(kind="input").inc()
            return
        if verdict.restart:
            self.metrics.daemon_restarts.inc()
            log.info("daemon_restarted", camera=msg.camera, topic=msg.topic, run_id=msg.run_id)
        if verdict.missing:  # what neither the live socket nor the replay brought
            self.metrics.input_gaps.labels(topic=msg.topic).inc()
            self.metrics.input_missing.labels(topic=msg.topic).inc(verdict.missing)
            log.warning(
                "input_gap", camera=msg.camera, topic=msg.topic, run_id=msg.run_id, seq=msg.seq, missing=verdict.missing
            )
        if msg.vehicle and msg.vehicle != self.vehicle and not self._vehicle_warned:
            self._vehicle_warned = True
            log.warning(
                "vehicle_mismatch",
                daemon=msg.vehicle,
                uplink=self.vehicle,
                action="forwarded under the uplink's vehicle; set the same id in both configs",
            )
        if verdict.filtered:
            self.metrics.filtered.inc()
            return
        rows.append((f"{self.cfg.mqtt.topic_prefix}/{self.vehicle}/{topic_level(msg.camera)}/{msg.topic}", msg.payload))
        topics.append(msg.topic)

    def housekeeping(self) -> None:
        drops = self.journal.trim()
        if drops:
            self.forwarder.dropped(drops)
            for reason, d in drops.items():
                self.metrics.dropped.labels(reason=reason).inc(d.count)
                log.warning(
                    "journal_dropped",
                    reason=reason,
                    messages=d.count,
                    bytes=d.bytes,
                    first_id=d.first_id,
                    last_id=d.last_id,
                )
        self.metrics.backlog_messages.set(self.journal.count)
        self.metrics.backlog_bytes.set(self.journal.bytes)
        oldest = self.journal.oldest_received()
        self.metrics.oldest_age.set(max(0.0, time.time() - oldest) if oldest is not None else 0.0)
