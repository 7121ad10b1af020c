"""ZeroMQ PUB socket for tags, events and status messages.

PUB never blocks and never grows without bound: each subscriber's queue is capped by the
send high-water mark, beyond which ZeroMQ drops messages for that subscriber only, and
LINGER bounds how long close() waits.
"""

from __future__ import annotations

import zmq
from pydantic import BaseModel

from retrofit_agent.contract.errors import PublishError
from retrofit_agent.daemon.config import PublishConfig
from retrofit_agent.daemon.curve import make_curve_server, server_keys
from retrofit_agent.daemon.metrics import AgentMetrics
from retrofit_agent.daemon.replay import ReplayRing, ReplayServer


class Publisher:
    """The PUB socket and, unless ``publish.replay`` is off, the replay of recent messages
    (:mod:`.replay`) on its sibling endpoint, for the run ``run_id``."""

    def __init__(
        self,
        cfg: PublishConfig,
        metrics: AgentMetrics,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        run_id: str = "",
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self._metrics = metrics
        self.socket = self._ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, cfg.send_hwm)
        self.socket.setsockopt(zmq.LINGER, cfg.linger_ms)
        self._auth = None
        self.ring: ReplayRing | None = None
        self.replay: ReplayServer | None = None
        address = cfg.endpoint
        try:
            if cfg.curve is not None:
                self._auth = make_curve_server(self.socket, cfg.curve.server_secret_key, cfg.curve.authorized_keys_dir)
            self.socket.bind(address)
            if cfg.replay:
                address = cfg.replay_address
                self.ring = ReplayRing(cfg.replay_bytes_per_topic)
                keys = server_keys(cfg.curve.server_secret_key) if cfg.curve is not None else None
                self.replay = ReplayServer(self._ctx, address, self.ring, run_id, keys)
                self.replay.start()
        except zmq.ZMQError as e:
            self.close()
            raise PublishError(f"publish endpoint {address}: cannot bind ({e.strerror})") from None
        except Exception:
            self.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, topic: str, message: BaseModel) -> bool:
        """Send one message without blocking; a failure is counted, never raised. The message is
        kept for replay either way: a subscriber that missed it can still ask."""
        payload = message.model_dump_json().encode()
        seq = getattr(message, "seq", None)
        if self.ring is not None and isinstance(seq, int):
            self.ring.add(topic, seq, payload)
        try:
            self.socket.send_multipart([topic.encode(), payload], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self._metrics.publish_errors.inc()
            return False
        self._metrics.messages_published.labels(topic=topic).inc()
        return True

    @property
    def encrypted(self) -> bool:
        return self._auth is not None

    def close(self) -> None:
        if self.replay is not None:
            self.replay.stop()
            self.replay = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.socket.close()
