"""The daemon's replay of recent messages: the ring's bounds, and the REQ/REP exchange over real
ZeroMQ sockets (the uplink's side of it is in tests/daemon/uplink)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq

from retrofit_agent.daemon import replay
from retrofit_agent.daemon.replay import ReplayClient, ReplayRing, ReplayServer, replay_endpoint_for


def payload(seq: int, size: int = 100) -> bytes:
    return json.dumps({"seq": seq, "pad": "x" * (size - len(str(seq)))}).encode()  # one size for every seq


def seqs(payloads: list[bytes]) -> list[int]:
    return [json.loads(p)["seq"] for p in payloads]


def test_the_ring_keeps_the_newest_within_its_bytes_per_topic_and_a_chatty_topic_never_evicts_a_rare_one():
    ring = ReplayRing(max_bytes_per_topic=(len(payload(0)) + replay.ITEM_OVERHEAD) * 10)
    ring.add("events", 0, payload(0))
    for s in range(100):
        ring.add("tags", s, payload(s))
    held = ring.held()
    assert held["tags"][:2] == (90, 99) and held["tags"][2] <= ring.max_bytes
    assert held["events"][:2] == (0, 0)
    first, got, more = ring.take("tags", 0, 95, max_bytes=10**6)
    assert first == 90 and seqs(got) == [90, 91, 92, 93, 94] and not more
    assert seqs(ring.take("tags", 97, 1000, 10**6)[1]) == [97, 98, 99]
    assert ring.take("captures", 0, 10, 10**6) == (None, [], False)


def test_the_ring_cuts_a_reply_at_its_byte_cap_and_starts_afresh_when_seq_does_not_follow():
    ring = ReplayRing(max_bytes_per_topic=10**6)
    for s in range(10):
        ring.add("tags", s, payload(s))
    first, got, more = ring.take("tags", 0, 10, max_bytes=3 * len(payload(0)))
    assert seqs(got) == [0, 1, 2] and more
    ring.add("tags", 0, payload(0))  # a seq that does not follow: never mix two sequences
    assert ring.held()["tags"][:2] == (0, 0)


def test_replay_endpoints_are_the_publish_endpoints_siblings():
    assert replay_endpoint_for("tcp://127.0.0.1:5556") == "tcp://127.0.0.1:5557"
    assert replay_endpoint_for("ipc:///run/retrofit/pub.sock") == "ipc:///run/retrofit/pub.sock.replay"
    with pytest.raises(ValueError):
        replay_endpoint_for("tcp://127.0.0.1:65535")


@pytest.fixture
def server(tmp_path: Path):
    ring = ReplayRing(10**6)
    for s in range(50):
        ring.add("events", s, payload(s))
    srv = ReplayServer(zmq.Context.instance(), f"ipc://{tmp_path}/replay", ring, run_id="run-a")
    srv.start()
    yield srv
    srv.stop()


def test_a_client_gets_the_stretch_it_missed_in_order_and_nothing_of_another_run(server: ReplayServer):
    client = ReplayClient(server.endpoint, timeout_ms=2000)
    got = client.fetch("run-a", "events", 10, 20)
    assert got is not None and got.first_held == 0 and seqs(got.payloads) == list(range(10, 20))
    other = client.fetch("run-b", "events", 0, 20)  # that run ended with its process
    assert other is not None and other.payloads == [] and other.run_id == "run-a"


def test_a_long_stretch_comes_in_several_replies(server: ReplayServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(replay, "MAX_REPLY_BYTES", 4 * len(payload(0)))
    got = ReplayClient(server.endpoint, timeout_ms=2000).fetch("run-a", "events", 5, 40)
    assert got is not None and seqs(got.payloads) == list(range(5, 40))
    assert server.served >= 9


def test_a_bad_request_is_answered_and_the_server_keeps_serving(server: ReplayServer):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(server.endpoint)
    s.send(b"not json")
    assert s.poll(2000)
    assert "error" in json.loads(s.recv_multipart()[0])
    s.close()
    got = ReplayClient(server.endpoint, timeout_ms=2000).fetch("run-a", "events", 0, 3)
    assert got is not None and seqs(got.payloads) == [0, 1, 2]


def test_no_daemon_costs_one_timeout_then_the_client_backs_off(tmp_path: Path):
    client = ReplayClient(f"ipc://{tmp_path}/nobody", timeout_ms=200, backoff_s=30)
    asks = []
    ask = client._ask
    client._ask = lambda req: asks.append(req) or ask(req)  # type: ignore[method-assign]
    assert client.fetch("r", "events", 0, 5) is None
    assert client.fetch("r", "events", 0, 5) is None  # backing off: not asked again
    assert len(asks) == 1
