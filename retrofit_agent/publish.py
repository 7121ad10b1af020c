"""ZeroMQ PUB socket for tags, events and status messages.

PUB never blocks and never grows without bound: each subscriber's queue is capped by the
send high-water mark, beyond which ZeroMQ drops messages for that subscriber only, and
LINGER bounds how long close() waits.
"""

from __future__ import annotations

import zmq
from pydantic import BaseModel

from retrofit_agent.config import PublishConfig
from retrofit_agent.errors import PublishError
from retrofit_agent.metrics import AgentMetrics


class Publisher:
    def __init__(self, cfg: PublishConfig, metrics: AgentMetrics, context: zmq.Context | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self._metrics = metrics
        self.socket = self._ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, cfg.send_hwm)
        self.socket.setsockopt(zmq.LINGER, cfg.linger_ms)
        try:
            self.socket.bind(cfg.endpoint)
        except zmq.ZMQError as e:
            self.socket.close(linger=0)
            raise PublishError(f"publish endpoint {cfg.endpoint}: cannot bind ({e.strerror})") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, topic: str, message: BaseModel) -> bool:
        """Send one message without blocking; a failure is counted, never raised."""
        try:
            self.socket.send_multipart(
                [topic.encode(), message.model_dump_json().encode()], flags=zmq.NOBLOCK
            )
        except zmq.ZMQError:
            self._metrics.publish_errors.inc()
            return False
        self._metrics.messages_published.labels(topic=topic).inc()
        return True

    def close(self) -> None:
        self.socket.close()
