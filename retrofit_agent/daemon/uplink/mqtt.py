"""The MQTT 5 link (paho-mqtt, v2 callback API): one long-lived client whose network thread
connects, reconnects with back-off and re-sends unacknowledged QoS 1 messages by itself.

Availability: the will is ``<prefix>/<vehicle>/availability`` = ``offline`` (retained, QoS 1),
published by the broker when the link dies; ``online`` is published (retained) on every
connect and ``offline`` on a clean stop. PUBACKs are handed to the main loop through a
thread-safe queue, as (message id, failed?) pairs.
"""

from __future__ import annotations

import queue
import ssl
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.uplink.config import MqttConfig, read_secret
from retrofit_agent.daemon.uplink.metrics import UplinkMetrics

log = structlog.get_logger("retrofit_agent.daemon.uplink.mqtt")


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """The TLS context for mqtts://; ConfigError (one line) naming a file that cannot be used."""
    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"mqtt.ca_file: cannot use {cfg.ca_file}: {_why(e)}") from None
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"mqtt.cert_file/key_file: cannot use {cfg.cert_file} with {cfg.key_file}: {_why(e)}"
            ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _why(e: Exception) -> str:
    return getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)


class Link:
    def __init__(self, cfg: MqttConfig, vehicle: str, metrics: UplinkMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.availability_topic = f"{cfg.topic_prefix}/{vehicle}/availability"
        self.acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        self.connected = threading.Event()
        self.generation = 0  # bumped on each successful connect (the main loop re-reads the backlog split)
        self._refusals = 0
        if cfg.tls or cfg.ca_file or cfg.cert_file:
            context: ssl.SSLContext | None = tls_context(cfg)
        else:
            context = None
        password = read_secret(
            cfg.password, Path(cfg.password_file) if cfg.password_file else None, "mqtt.password_file"
        )
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"retrofit-uplink-{vehicle}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if context is not None:
            client.tls_set_context(context)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, password)
        client.will_set(self.availability_topic, b"offline", qos=1, retain=True)
        client.reconnect_delay_set(int(max(1, cfg.backoff_initial_s)), int(max(1, cfg.backoff_max_s)))
        client.max_inflight_messages_set(cfg.inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client

    def start(self) -> None:
        """Connect in the background: a broker that is not reachable yet is retried, never fatal."""
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        log.info("mqtt_connecting", broker=f"{self.cfg.host}:{self.cfg.port}", tls=self.cfg.tls)

    def is_connected(self) -> bool:
        return self.connected.is_set()

    def take_acks(self) -> list[tuple[int, bool]]:
        out = []
        while True:
            try:
                out.append(self.acks.get_nowait())
            except queue.Empty:
                return out

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int | None:
        """Send with QoS 1; the message id whose PUBACK will come back on ``acks``, or None if not sent."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        # NO_CONN: the link dropped a moment ago; paho keeps the message and sends it on reconnect.
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            return None
        return int(info.mid)

    def publish_and_wait(self, topic: str, payload: bytes, timeout_s: float) -> bool:
        """Publish and wait for the PUBACK (used by the capture thread's MQTT fallback)."""
        info = self.client.publish(topic, payload, qos=1)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            return False
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def stop(self) -> None:
        """Say offline (retained) on a clean stop, then disconnect; the will covers every other end."""
        if self.connected.is_set():
            info = self.client.publish(self.availability_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(2.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------ paho's network thread

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        if reason.is_failure:
            self._refusals += 1
            # Bad credentials or a refused certificate: paho keeps retrying with back-off; say it once per streak.
            if self._refusals == 1:
                log.error("mqtt_refused", broker=f"{self.cfg.host}:{self.cfg.port}", reason=str(reason))
            return
        self._refusals = 0
        self.generation += 1
        self.metrics.broker_connects.inc()
        self.metrics.broker_connected.set(1)
        client.publish(self.availability_topic, b"online", qos=1, retain=True)
        self.connected.set()
        log.info("mqtt_connected", broker=f"{self.cfg.host}:{self.cfg.port}")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._refusals += 1
        if self._refusals == 1:
            log.warning("mqtt_unreachable", broker=f"{self.cfg.host}:{self.cfg.port}", retry="with back-off")

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.metrics.broker_connected.set(0)
        if was:
            log.warning("mqtt_disconnected", reason=str(reason))

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self.acks.put((mid, bool(reason.is_failure)))
