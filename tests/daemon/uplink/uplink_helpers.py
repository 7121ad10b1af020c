"""Real servers for the uplink's tests, each on a free loopback port: Debian's mosquitto,
moto's standalone S3 server (PyPI ``moto[server]``), and the uplink itself as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import REPO, agent_command, free_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def need_mosquitto() -> str:
    if MOSQUITTO is None:
        pytest.skip("mosquitto not found; installed by scripts/test.sh (apt-get install mosquitto)")
    return MOSQUITTO


class Broker:
    """mosquitto with persistence, so that a consumer's session (and its queued QoS 1
    messages) survives the broker being stopped and started again."""

    def __init__(self, directory: Path, extra: str = "", port: int | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        conf = self.dir / "mosquitto.conf"
        listener = (
            self.extra
            if "listener" in self.extra
            else f"listener {self.port} 127.0.0.1\nallow_anonymous true\n" + self.extra
        )
        conf.write_text(
            f"{listener}\npersistence true\npersistence_location {self.dir}/\nautosave_interval 1\n"
            "max_queued_messages 1000000\nmax_inflight_messages 0\nlog_dest stderr\nlog_type error\n"
            # Started as root (CI), mosquitto would switch to the 'mosquitto' user, who cannot read the test's files.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.log = open(self.dir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([need_mosquitto(), "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


@dataclass
class Consumer:
    """A backend: a persistent MQTT 5 session on ``<prefix>/#`` that records every message and
    de-duplicates by (vehicle, camera, run_id, topic, seq), as the README's consumer contract says."""

    port: int
    topic: str = "retrofit/#"
    client_id: str = "backend-test"
    tls: dict | None = None
    auth: tuple[str, str] | None = None
    messages: list[tuple[str, bytes, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Consumer:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=MQTTProtocolVersion.MQTTv5)
        if self.tls:
            c.tls_set(**self.tls)
        if self.auth:
            c.username_pw_set(*self.auth)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600

        def on_connect(client, userdata, flags, reason, properties):
            if not reason.is_failure:
                client.subscribe(self.topic, qos=1)

        def on_message(client, userdata, msg):
            with self.lock:
                self.messages.append((msg.topic, bytes(msg.payload), time.monotonic()))

        c.on_connect = on_connect
        c.on_message = on_message
        c.reconnect_delay_set(1, 1)
        c.connect_async("127.0.0.1", self.port, clean_start=False, properties=props)
        c.loop_start()
        self.client = c
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def bodies(self, suffix: str | None = None) -> list[tuple[str, dict]]:
        with self.lock:
            msgs = list(self.messages)
        out = []
        for topic, payload, _ in msgs:
            if suffix is None or topic.endswith(suffix):
                try:
                    out.append((topic, json.loads(payload)))
                except ValueError:
                    out.append((topic, {"raw": payload.decode(errors="replace")}))
        return out

    def deduplicated(self) -> tuple[dict[tuple, list[dict]], int]:
        """Per stream (vehicle, camera, run_id, topic), the messages in arrival order without duplicates;
        and how many duplicates were dropped."""
        seen: set[tuple] = set()
        streams: dict[tuple, list[dict]] = {}
        dups = 0
        for _topic, body in self.bodies():
            if "seq" not in body:
                continue
            key = (body["vehicle"], body["camera"], body["run_id"], body["topic"], body["seq"])
            if key in seen:
                dups += 1
                continue
            seen.add(key)
            streams.setdefault(key[:4], []).append(body)
        return streams, dups


class Uplink:
    """``retrofit-agent uplink`` as a subprocess with JSON logs."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str] | None = None, name: str = "uplink") -> None:
        self.tmp, self.args, self.env, self.name = tmp, args, env or {}, name
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Uplink:
        log = open(self.tmp / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            agent_command(
                "uplink", "--log-format", "json", "--metrics-address", f"127.0.0.1:{self.metrics_port}", *self.args
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **self.env},
        )
        self.starts += 1
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.logs()[-3000:]
            if any(e.get("event") == "uplink_ready" for e in self.events()[-50:]):
                return
            time.sleep(0.05)
        raise AssertionError(f"uplink not ready: {self.logs()[-3000:]}")

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        from helpers import metric

        return metric(self.scrape(), name)

    def logs(self) -> str:
        path = self.tmp / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(15)
        return self.proc.returncode if self.proc else 0


class S3Server:
    """moto's standalone S3 server (``moto_server``) on loopback, with a bucket."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path) -> S3Server:
        exe = Path(sys.executable).parent / "moto_server"
        if not exe.exists():
            pytest.skip("moto_server not found; pip install 'moto[server]' (the test extra)")
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_port(self.port, self.proc, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self):  # boto3, as a backend would read the bucket (test-side only)
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="AKIDTEST",
            aws_secret_access_key="secret-test",
        )


def write_pair(store: Path, campaign: str, name: str, image: bytes, camera: str = "front") -> Path:
    """A capture pair as the daemon's store writes it (image first, sidecar last)."""
    import hashlib

    day = f"{name[:4]}-{name[4:6]}-{name[6:8]}"
    folder = store / campaign / day
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jpg").write_bytes(image)
    sidecar = {
        "schema_version": 1,
        "campaign": campaign,
        "capture_id": name,
        "image": f"{name}.jpg",
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "camera": camera,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(sidecar, sort_keys=True) + "\n")
    return path


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout}s")
