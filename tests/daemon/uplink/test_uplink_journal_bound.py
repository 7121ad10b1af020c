"""A long outage at a high rate, end to end: the real uplink fed far faster than any camera by a
ZeroMQ publisher of well-formed daemon messages, with Debian's mosquitto down, then back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zmq
from uplink_helpers import Broker, Consumer, Uplink, need_mosquitto, wait_until

from helpers import metric

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOUND = 1024**2  # journal.max_bytes' floor
N = 3000  # ~2 KB each: about 6 MB, six times the bound
PAD = "x" * 2000


def message(topic: str, run_id: str, seq: int) -> bytes:
    body = {"schema_version": 2, "topic": topic, "run_id": run_id, "vehicle": "car-bound", "camera": "front"}
    return json.dumps({**body, "seq": seq, "pad": PAD}).encode()


def test_a_long_outage_at_a_high_rate_keeps_the_journal_bound_drops_oldest_first_and_counts_exactly(tmp_path: Path):
    need_mosquitto()
    broker = Broker(tmp_path / "broker").start()
    consumer = Consumer(broker.port, client_id="backend-bound").start()
    wait_until(lambda: consumer.client.is_connected(), 10, "consumer connected")
    broker.stop()  # the outage: the consumer's session waits in the broker's persistence
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/daemon.sock"
    pub.bind(endpoint)
    uplink = Uplink(
        tmp_path,
        [
            *("--endpoint", endpoint, "--mqtt", f"mqtt://127.0.0.1:{broker.port}"),
            *("--journal", str(tmp_path / "journal"), "--vehicle", "car-bound", "--tags", "all"),
        ],
        env={
            "RETROFIT_UPLINK_INPUT__REPLAY": "false",  # a fake daemon serves no replay
            "RETROFIT_UPLINK_JOURNAL__MAX_BYTES": str(BOUND),
            "RETROFIT_UPLINK_MQTT__BACKOFF_MAX_S": "1",
        },
        name="uplink-bound",
    ).start()
    try:
        uplink.wait_ready()
        warm = 0  # until the subscription has reached the publisher (ZeroMQ's slow joiner)
        while uplink.metric('retrofit_uplink_received_total{topic="status"') == 0:
            pub.send_multipart([b"status", message("status", "warm-up", warm)])
            warm += 1
            time.sleep(0.05)
        for seq in range(N):
            pub.send_multipart([b"tags", message("tags", "burst", seq)])
            if seq % 200 == 199:
                time.sleep(0.05)  # below the uplink's receive HWM: the test is about the journal
        wait_until(lambda: uplink.metric('retrofit_uplink_received_total{topic="tags"') == N, 60, "all received")
        time.sleep(2.5)  # housekeeping trims once a second
        text = uplink.scrape()
        journaled = metric(text, "retrofit_uplink_journaled_total")
        warm_journaled = metric(text, 'retrofit_uplink_journaled_total{topic="status"')
        backlog = metric(text, "retrofit_uplink_backlog_messages")
        backlog_bytes = metric(text, "retrofit_uplink_backlog_bytes")
        dropped = metric(text, 'retrofit_uplink_dropped_total{reason="journal_bytes"')
        print(
            f"\n[uplink figure] journal bound {BOUND} B: {backlog:.0f} messages, {backlog_bytes:.0f} B kept; "
            f"{dropped:.0f} of {journaled:.0f} dropped"
        )
        assert backlog_bytes <= BOUND
        assert dropped == journaled - backlog > 0, "every message journaled is either kept or counted as dropped"
        broker.start()  # the link returns
        wait_until(lambda: uplink.metric("retrofit_uplink_backlog_messages") == 0, 60, "backlog drained")
        wait_until(lambda: len(consumer.messages) >= backlog, 30, "consumer got the backlog")
    finally:
        uplink.stop()
        consumer.stop()
        broker.stop()
        pub.close()
    streams, _ = consumer.deduplicated()
    seqs = [m["seq"] for m in streams.get(("car-bound", "front", "burst", "tags"), [])]
    # The oldest went first: what arrives is the newest stretch, whole and in order.
    assert seqs == list(range(N - len(seqs), N)), (seqs[:3], seqs[-3:])
    warm = len(streams.get(("car-bound", "front", "warm-up", "status"), []))
    # Counted exactly: every drop is a message that never arrived, and every message that never arrived was counted.
    assert dropped == (N - len(seqs)) + (warm_journaled - warm)
