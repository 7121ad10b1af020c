"""The uplink's parts on their own: the journal's bounds, stream judging, SigV4, the forwarder."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.uplink.config import UplinkConfig, load_uplink_config
from retrofit_agent.daemon.uplink.forwarder import Forwarder
from retrofit_agent.daemon.uplink.journal import ROW_OVERHEAD, Journal, Row
from retrofit_agent.daemon.uplink.metrics import UplinkMetrics
from retrofit_agent.daemon.uplink.s3 import sign_v4
from retrofit_agent.daemon.uplink.source import Incoming, StreamTracker


def test_journal_over_its_byte_bound_drops_the_oldest_first_and_counts_them_exactly(tmp_path: Path):
    row = 1000
    j = Journal(tmp_path, max_bytes=50 * (row + ROW_OVERHEAD), max_age_s=3600)
    j.append([("s", bytes(row))] * 80, {})
    drops = j.trim()
    assert drops["journal_bytes"].count == 30 and j.count == 50
    assert j.bytes <= j.max_bytes
    assert [r.id for r in j.next_rows("s", 0, 100)] == list(range(31, 81))  # the newest 50 stay


def test_journal_drops_messages_past_their_age(tmp_path: Path):
    j = Journal(tmp_path, max_bytes=10**9, max_age_s=60)
    j.append([("s", b"old")] * 3, {}, now=1000.0)
    j.append([("s", b"new")] * 2, {}, now=1050.0)
    drops = j.trim(now=1070.0)
    assert drops["journal_age"].count == 3 and j.count == 2


def test_journal_survives_reopening_with_ids_that_never_repeat(tmp_path: Path):
    j = Journal(tmp_path, max_bytes=10**9, max_age_s=3600)
    ids = j.append([("s", b"a"), ("s", b"b")], {"front/tags": ("run1", 7)})
    j.delete(ids, sent_high=ids[-1])
    j.close()
    j = Journal(tmp_path, max_bytes=10**9, max_age_s=3600)
    assert j.count == 0 and j.input_streams() == {"front/tags": ("run1", 7)} and j.get_meta("sent_high") == "2"
    assert j.append([("s", b"c")], {}) == [3]


def msg(seq: int, run: str = "r1", topic: str = "events", tags: list[str] | None = None) -> Incoming:
    body = {"tags": [{"group": t.split(".")[0], "label": t.split(".")[1]} for t in (tags or [])]}
    return Incoming(topic, "front", run, seq, "car", b"{}", body)


def test_a_seq_jump_within_a_run_is_a_gap_and_a_new_run_id_is_a_restart_not_a_gap():
    t = StreamTracker()
    assert t.judge(msg(0)).missing == 0
    assert t.judge(msg(1)).missing == 0
    assert t.judge(msg(5)).missing == 3
    v = t.judge(msg(0, run="r2"))
    assert v.restart and v.missing == 0 and v.keep
    assert t.judge(msg(0, run="r2")).duplicate
    v = t.judge(msg(3, run="r3"))  # a new run's seq 0..2 never arrived
    assert v.restart and v.missing == 3


def test_the_tracker_names_the_stretch_to_ask_the_daemons_replay_for():
    t = StreamTracker()
    assert t.expected(msg(4)) == 0  # a stream never seen: from its run's start
    t.judge(msg(4))
    assert t.expected(msg(5)) is None
    assert t.expected(msg(9)) == 5
    assert t.expected(msg(2, run="r2")) == 0 and t.expected(msg(0, run="r2")) is None


def test_tags_filter_all_every_nth_and_changes_only():
    def kept(mode: str, tags_per_frame: list[list[str]]) -> list[int]:
        t = StreamTracker(tags_mode=mode, tags_every_n=3)
        return [i for i, tags in enumerate(tags_per_frame) if t.judge(msg(i, topic="tags", tags=tags)).keep]

    frames = [[], [], ["weather.rain"], ["weather.rain"], [], [], []]
    assert kept("all", frames) == list(range(7))
    assert kept("every_n", frames) == [0, 3, 6]
    assert kept("changes", frames) == [0, 2, 4]


def test_sigv4_signature_matches_botocore(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("botocore")
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=timezone.utc)
    body = b"hello"
    import hashlib

    sha = hashlib.sha256(body).hexdigest()
    ours = sign_v4(
        "PUT",
        "127.0.0.1:9000",
        "/bucket/captures/car-1/rain/2026-11-29/a%20b.jpg",
        {"partNumber": "1", "uploadId": "xyz"},
        {"Content-MD5": "XUFAKrxLKna5cZ2REBfFkg=="},
        sha,
        "AKIDTEST",
        "secret-test",
        "us-east-1",
        now,
    )
    req = AWSRequest(
        method="PUT",
        url="http://127.0.0.1:9000/bucket/captures/car-1/rain/2026-11-29/a%20b.jpg?partNumber=1&uploadId=xyz",
        data=body,
        headers={"Content-MD5": "XUFAKrxLKna5cZ2REBfFkg==", "X-Amz-Content-SHA256": sha},
    )
    signer = S3SigV4Auth(Credentials("AKIDTEST", "secret-test"), "s3", "us-east-1")
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: now.replace(tzinfo=None))
    signer.add_auth(req)
    theirs = req.headers["Authorization"]
    assert ours["Authorization"].split("Signature=")[1] == theirs.split("Signature=")[1], (ours, theirs)


class FakeLink:
    def __init__(self) -> None:
        self.generation = 1
        self.connected = True
        self.sent: list[tuple[int, str, bytes]] = []
        self.acks: list[tuple[int, bool]] = []
        self.mid = 0

    def is_connected(self) -> bool:
        return self.connected

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int | None:
        self.mid += 1
        self.sent.append((self.mid, topic, payload))
        return self.mid

    def take_acks(self) -> list[tuple[int, bool]]:
        out, self.acks = self.acks, []
        return out


def test_backlog_is_rate_limited_while_live_events_go_out_at_once_and_order_per_topic_holds(tmp_path: Path):
    j = Journal(tmp_path, max_bytes=10**9, max_age_s=3600)
    backlog = j.append([("v/front/tags", json.dumps({"seq": i}).encode()) for i in range(500)], {})
    link = FakeLink()
    metrics = UplinkMetrics.create(CollectorRegistry())
    fw = Forwarder(j, link, metrics, window=10_000, backlog_rate=100)
    fw.pump()
    first = len(link.sent)
    assert first <= 20, "the backlog spends tokens: a burst of a tenth of a second at most"
    live = j.append([("v/front/events", b'{"seq": 0}')], {})
    fw.appended([Row(live[0], "v/front/events", b'{"seq": 0}')])
    fw.pump()
    assert any(t == "v/front/events" for _, t, _ in link.sent), "a live event is not held behind the tags backlog"
    link.acks = [(mid, False) for mid, _, _ in link.sent]
    fw.pump()
    assert j.count == 501 - len(link.sent), "a row goes once its PUBACK came back, not before"
    seqs = [json.loads(p)["seq"] for _, t, p in link.sent if t.endswith("tags")]
    assert seqs == sorted(seqs) and seqs[0] == 0 and len(backlog) == 500


def test_config_reads_file_environment_and_flags_and_refuses_a_wildcard_topic_prefix(tmp_path: Path):
    f = tmp_path / "uplink.toml"
    f.write_text('vehicle = "car-9"\n[mqtt]\nurl = "mqtts://broker.example:8883"\ntopic_prefix = "fleet/eu"\n')
    cfg = load_uplink_config(f, {"RETROFIT_UPLINK_INPUT__TAGS": "all"}, {"journal.directory": "/tmp/j"})
    assert isinstance(cfg, UplinkConfig) and cfg.vehicle == "car-9" and cfg.mqtt.tls and cfg.mqtt.port == 8883
    assert cfg.input.tags == "all" and str(cfg.journal.directory) == "/tmp/j"
    with pytest.raises(ConfigError, match="mqtt.topic_prefix"):
        load_uplink_config(None, {"RETROFIT_UPLINK_MQTT__TOPIC_PREFIX": "fleet/+/x"})
