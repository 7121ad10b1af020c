"""Every metric the uplink exports, built on a registry it is given (its own, on its own port)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from retrofit_agent.contract.messages import TOPICS

DROP_REASONS = ("journal_bytes", "journal_age", "rejected", "malformed")
DUPLICATE_KINDS = ("input", "resent")


@dataclass
class UplinkMetrics:
    registry: CollectorRegistry
    received: Counter
    filtered: Counter
    journaled: Counter
    forwarded: Counter
    dropped: Counter
    duplicates: Counter
    input_gaps: Counter
    input_missing: Counter
    daemon_restarts: Counter
    replayed: Counter
    replay_failures: Counter
    backlog_messages: Gauge
    backlog_bytes: Gauge
    oldest_age: Gauge
    broker_connected: Gauge
    broker_connects: Counter
    captures_uploaded: Counter
    capture_bytes_uploaded: Counter
    capture_failures: Counter
    captures_pending: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> UplinkMetrics:
        p = "retrofit_uplink_"
        m = cls(
            registry=registry,
            received=Counter(
                p + "received", "Messages received from the daemon, by topic.", ["topic"], registry=registry
            ),
            filtered=Counter(
                p + "filtered", "Tags messages not kept by input.tags (all/every_n/changes).", registry=registry
            ),
            journaled=Counter(
                p + "journaled", "Messages appended to the journal, by topic.", ["topic"], registry=registry
            ),
            forwarded=Counter(
                p + "forwarded", "Messages the broker acknowledged (PUBACK), by topic.", ["topic"], registry=registry
            ),
            dropped=Counter(
                p + "dropped",
                "Messages dropped, by reason (journal_bytes, journal_age: a journal bound "
                "bit, oldest first; rejected: the broker refused it; malformed: not a daemon message).",
                ["reason"],
                registry=registry,
            ),
            duplicates=Counter(
                p + "duplicates",
                "Duplicates: 'input' received twice and dropped; 'resent' published "
                "again after a crash or reconnect (the consumer de-duplicates them).",
                ["kind"],
                registry=registry,
            ),
            input_gaps=Counter(
                p + "input_gaps",
                "Gaps in a stream's seq within one run_id that the daemon's replay could not fill (lost).",
                ["topic"],
                registry=registry,
            ),
            input_missing=Counter(
                p + "input_missing_messages", "Messages missing in those gaps.", ["topic"], registry=registry
            ),
            replayed=Counter(
                p + "replayed",
                "Messages a gap in seq missed, taken from the daemon's replay, by topic.",
                ["topic"],
                registry=registry,
            ),
            replay_failures=Counter(
                p + "replay_failures",
                "Asks for a replay the daemon did not answer (not running, or replay off).",
                registry=registry,
            ),
            daemon_restarts=Counter(
                p + "daemon_restarts", "Streams that came back under a new run_id.", registry=registry
            ),
            backlog_messages=Gauge(
                p + "backlog_messages", "Messages in the journal not yet acknowledged.", registry=registry
            ),
            backlog_bytes=Gauge(
                p + "backlog_bytes", "Bytes of those messages (payload and per-row overhead).", registry=registry
            ),
            oldest_age=Gauge(
                p + "oldest_message_age_seconds",
                "Age of the oldest message in the journal (0: empty).",
                registry=registry,
            ),
            broker_connected=Gauge(p + "broker_connected", "1 while connected to the MQTT broker.", registry=registry),
            broker_connects=Counter(p + "broker_connects", "Successful connections to the broker.", registry=registry),
            captures_uploaded=Counter(
                p + "captures_uploaded",
                "Capture pairs uploaded, confirmed and deleted locally.",
                ["transport"],
                registry=registry,
            ),
            capture_bytes_uploaded=Counter(p + "capture_uploaded_bytes", "Bytes of those pairs.", registry=registry),
            capture_failures=Counter(
                p + "capture_failures", "Failed upload attempts, by reason.", ["reason"], registry=registry
            ),
            captures_pending=Gauge(
                p + "captures_pending", "Complete pairs in the store waiting for upload.", registry=registry
            ),
        )
        for t in TOPICS:
            for c in (m.received, m.journaled, m.forwarded, m.input_gaps, m.input_missing, m.replayed):
                c.labels(topic=t)
        for r in DROP_REASONS:
            m.dropped.labels(reason=r)
        for k in DUPLICATE_KINDS:
            m.duplicates.labels(kind=k)
        for t in ("s3", "mqtt"):
            m.captures_uploaded.labels(transport=t)
        return m
