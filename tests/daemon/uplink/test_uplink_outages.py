"""Nothing lost: the real daemon on a looping clip, the uplink, Debian's mosquitto and a backend
consumer that de-duplicates by (vehicle, camera, run_id, topic, seq). A reference ZeroMQ
subscriber records what the daemon published, to compare with what reached the backend.

Figures (drain time, duplicates) are printed, never judged.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from uplink_helpers import Broker, Consumer, Uplink, need_mosquitto, wait_until

from helpers import REPO, agent_command, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
VEHICLE = "car-test-1"


def figure(name: str, value: object) -> None:
    print(f"\n[uplink figure] {name}: {value}", flush=True)


class Daemon:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.endpoint = f"ipc://{tmp}/daemon.sock"
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> None:
        log = open(self.tmp / f"daemon-{self.runs}.log", "wb")
        self.proc = subprocess.Popen(
            agent_command(
                "--camera",
                str(REPO / "models/sample/drive.mp4"),
                "--loop",
                "--realtime",
                "--threads",
                "1",
                "--publish",
                self.endpoint,
                "--metrics-address",
                f"127.0.0.1:{free_port()}",
                "--log-format",
                "json",
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={
                **os.environ,
                "RETROFIT_PUBLISH__VEHICLE": VEHICLE,
                "RETROFIT_PUBLISH__STATUS_INTERVAL_S": "0.5",
                "RETROFIT_PUBLISH__SEND_HWM": "10000",
            },
        )
        self.runs += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


class Reference(threading.Thread):
    """Everything the daemon publishes, straight from its socket."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.messages: list[dict] = []
        self.arrived: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, 100000)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(self.endpoint)
        while not self.halt.is_set():
            if s.poll(100):
                self.messages.append(json.loads(s.recv_multipart()[1]))
                self.arrived.append(time.monotonic())
        s.close(0)

    def keys(self, since: float = 0.0) -> set[tuple]:
        """Messages that arrived after ``since`` (monotonic)."""
        return {
            (m["vehicle"], m["camera"], m["run_id"], m["topic"], m["seq"])
            for m, t in zip(self.messages, self.arrived)
            if t >= since
        }


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    need_mosquitto()
    tmp = tmp_path_factory.mktemp("uplink-outages")
    broker = Broker(tmp / "broker").start()
    daemon = Daemon(tmp)
    daemon.start()
    yield {"tmp": tmp, "broker": broker, "daemon": daemon}
    daemon.stop()
    broker.stop()


def start_uplink(rig: dict, name: str, journal: str = "journal") -> Uplink:
    tmp = rig["tmp"]
    return Uplink(
        tmp,
        [
            "--endpoint",
            rig["daemon"].endpoint,
            "--mqtt",
            f"mqtt://127.0.0.1:{rig['broker'].port}",
            "--journal",
            str(tmp / journal),
            "--vehicle",
            VEHICLE,
            "--tags",
            "all",
        ],
        env={"RETROFIT_UPLINK_MQTT__BACKOFF_MAX_S": "2"},
        name=name,
    ).start()


def delivered_everything(reference: Reference, consumer: Consumer, window: set[tuple]) -> tuple[set, int]:
    streams, dups = consumer.deduplicated()
    got = {(*k, m["seq"]) for k, msgs in streams.items() for m in msgs}
    return window - got, dups


def in_order(consumer: Consumer) -> bool:
    streams, _ = consumer.deduplicated()
    return all([m["seq"] for m in msgs] == sorted(m["seq"] for m in msgs) for msgs in streams.values())


def test_a_30_s_broker_outage_loses_nothing_and_the_backlog_drains_in_order(rig: dict):
    consumer = Consumer(rig["broker"].port, client_id="backend-outage").start()
    wait_until(lambda: consumer.client.is_connected(), 10, "consumer connected")
    reference = Reference(rig["daemon"].endpoint)
    reference.start()
    uplink = start_uplink(rig, "uplink-outage")
    uplink.wait_ready()
    since = time.monotonic() + 1.0  # the uplink's SUB socket has joined by then
    time.sleep(4)
    rig["broker"].stop()
    outage_start = time.monotonic()
    time.sleep(30)
    during = len(reference.messages)
    rig["broker"].start()
    restarted = time.monotonic()
    wait_until(lambda: uplink.metric("retrofit_uplink_broker_connected") == 1, 60, "uplink reconnected")
    wait_until(lambda: any(e.get("event") == "backlog_drained" for e in uplink.events()), 120, "backlog drained")
    drained = time.monotonic() - restarted
    time.sleep(2)
    reference.halt.set()
    reference.join()
    # Everything the daemon published from a second after the uplink was ready until the end.
    window = reference.keys(since)
    try:  # the last messages may still be on their way (journaled, in flight)
        wait_until(lambda: not delivered_everything(reference, consumer, window)[0], 15, "all delivered")
    except AssertionError:
        pass
    missing, dups = delivered_everything(reference, consumer, window)
    figure("broker outage (s)", round(restarted - outage_start, 1))
    figure("messages published during the run", during)
    figure("drain time after the broker returned (s)", round(drained, 2))
    figure(
        "uplink's own drain log (s)", [e.get("seconds") for e in uplink.events() if e.get("event") == "backlog_drained"]
    )
    figure("duplicates dropped by the consumer", dups)
    uplink.stop()
    consumer.stop()
    figure(
        "messages in the window, by topic",
        {t: sum(1 for k in window if k[3] == t) for t in ("tags", "events", "status", "captures")},
    )
    assert window and not missing, f"{len(missing)} messages never reached the backend, e.g. {sorted(missing)[:5]}"
    assert in_order(consumer)


def test_the_uplink_killed_with_sigkill_at_random_moments_loses_nothing(rig: dict):
    consumer = Consumer(rig["broker"].port, client_id="backend-crash").start()
    wait_until(lambda: consumer.client.is_connected(), 10, "consumer connected")
    reference = Reference(rig["daemon"].endpoint)
    reference.start()
    rng = random.Random(17)
    uplink = start_uplink(rig, "uplink-crash", journal="journal-crash")
    uplink.wait_ready()
    since = time.monotonic() + 1.0
    time.sleep(1)
    kills = 6
    for _ in range(kills):
        time.sleep(rng.uniform(0.2, 2.5))
        uplink.kill()
        uplink.start()
        uplink.wait_ready()
    time.sleep(3)
    wait_until(lambda: uplink.metric("retrofit_uplink_backlog_messages") == 0, 60, "backlog empty")
    reference.halt.set()
    reference.join()
    try:
        wait_until(lambda: not delivered_everything(reference, consumer, reference.keys(since))[0], 15, "delivered")
    except AssertionError:
        pass
    uplink.stop()
    consumer.stop()
    streams, dups = consumer.deduplicated()
    got = {(*k, m["seq"]) for k, msgs in streams.items() for m in msgs}
    missing = reference.keys(since) - got
    # What was published while no uplink ran, the restarted uplink took from the daemon's replay.
    events = uplink.events()
    replayed = sum(e.get("messages", 0) for e in events if e.get("event") == "replayed")
    reported = sum(e.get("missing", 0) for e in events if e.get("event") == "input_gap")
    figure("uplink SIGKILLs", kills)
    figure("messages published while no uplink ran, taken from the daemon's replay", replayed)
    figure("messages reported lost (input gaps)", reported)
    figure("messages missing at the backend", len(missing))
    figure("duplicates dropped by the consumer (re-sent after a crash)", dups)
    assert replayed > 0, "each restart missed something, and the replay brought it"
    assert not missing and reported == 0, f"{len(missing)} missing, {reported} reported: {sorted(missing)[:5]}"
    assert in_order(consumer)


def test_a_daemon_restart_is_a_new_run_id_not_a_gap(rig: dict):
    consumer = Consumer(rig["broker"].port, client_id="backend-restart").start()
    wait_until(lambda: consumer.client.is_connected(), 10, "consumer connected")
    uplink = start_uplink(rig, "uplink-restart", journal="journal-restart")
    uplink.wait_ready()
    time.sleep(3)
    rig["daemon"].stop()
    rig["daemon"].start()
    wait_until(lambda: uplink.metric("retrofit_uplink_daemon_restarts_total") >= 1, 60, "restart seen")
    time.sleep(3)
    gaps = uplink.metric("retrofit_uplink_input_gaps_total")
    uplink.stop()
    consumer.stop()
    streams, _ = consumer.deduplicated()
    runs = {k[2] for k in streams if k[3] == "tags"}
    assert len(runs) == 2, runs
    assert gaps == 0, "a restart is not a loss"
    for key, msgs in streams.items():
        seqs = [m["seq"] for m in msgs]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{key}: not contiguous"
    new_run = [msgs for k, msgs in streams.items() if k[3] == "tags" and msgs[0]["seq"] == 0]
    assert new_run, "the new run's tags start at seq 0"


def test_an_uplink_started_after_the_daemon_takes_what_it_published_before(rig: dict):
    """Boot order: the daemon comes up first; the uplink's first start replays its run from seq 0
    (status and events; the rig's daemon has run longer than the replay holds tags)."""
    consumer = Consumer(rig["broker"].port, client_id="backend-late").start()
    wait_until(lambda: consumer.client.is_connected(), 10, "consumer connected")
    uplink = start_uplink(rig, "uplink-late", journal="journal-late")
    uplink.wait_ready()
    wait_until(lambda: uplink.metric("retrofit_uplink_replayed_total") > 0, 30, "replayed")
    time.sleep(2)
    replayed = uplink.metric("retrofit_uplink_replayed_total")
    uplink.stop()
    consumer.stop()
    streams, _ = consumer.deduplicated()
    status = {k: msgs for k, msgs in streams.items() if k[3] == "status"}
    current = max(status, key=lambda k: status[k][-1]["at"])  # the daemon's present run
    seqs = [m["seq"] for m in status[current]]
    figure("messages published before the uplink's first start, replayed", replayed)
    assert seqs == list(range(len(seqs))) and len(seqs) > 4, seqs[:10]
