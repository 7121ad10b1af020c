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
from retrofit_agent.daemon.curve import make_curve_server
from retrofit_agent.daemon.metrics import AgentMetrics


class Publisher:
    def __init__(
        self, cfg: PublishConfig, metrics: AgentMetrics, context: zmq.Context[zmq.Socket[bytes]] | None = None
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self._metrics = metrics
        self.socket = self._ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, cfg.send_hwm)
        self.socket.setsockopt(zmq.LINGER, cfg.linger_ms)
        self._auth = None
        try:
            if cfg.curve is not None:
                self._auth = make_curve_server(self.socket, cfg.curve.server_secret_key, cfg.curve.authorized_keys_dir)
            self.socket.bind(cfg.endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise PublishError(f"publish endpoint {cfg.endpoint}: cannot bind ({e.strerror})") from None
        except Exception:
            self.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, topic: str, message: BaseModel) -> bool:
        """Send one message without blocking; a failure is counted, never raised."""
        try:
            self.socket.send_multipart([topic.encode(), message.model_dump_json().encode()], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self._metrics.publish_errors.inc()
            return False
        self._metrics.messages_published.labels(topic=topic).inc()
        return True

    @property
    def encrypted(self) -> bool:
        return self._auth is not None

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.socket.close()
