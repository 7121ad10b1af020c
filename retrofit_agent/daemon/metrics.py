"""Every Prometheus metric the daemon exports, built on a registry it is given.

Nothing is registered at import time; tests build an :class:`AgentMetrics` on a fresh
``CollectorRegistry`` and read it with ``registry.get_sample_value``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from retrofit_agent.contract.errors import PublishError

# Stage latencies run from well under a millisecond (labelling) to hundreds (inference on
# a loaded camera); the 5–500 ms range where the end-to-end budget lives is densest.
STAGE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.035,
    0.04,
    0.05,
    0.06,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
# 'regions' is observed only while the model's cells are turned into boxes (issue 15).
STAGES = ("capture_wait", "preprocess", "inference", "labelling", "regions", "publish")


THERMAL_STATES = ("ok", "throttled", "critical", "unknown")


@dataclass
class BudgetMetrics:
    """The model's choice at start-up and its CPU and thermal budgets (daemon/variants.py, budget_cpu.py)."""

    variant: Info
    variant_inference_seconds: Gauge
    frames_skipped: Counter
    rate_limit_fps: Gauge
    cpu_cores: Gauge
    thermal_celsius: Gauge
    thermal_state: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> BudgetMetrics:
        p = "retrofit_"
        m = cls(
            variant=Info(
                p + "model_variant", "The variant, threads and spinning timed fastest at start-up.", registry=registry
            ),
            variant_inference_seconds=Gauge(
                p + "variant_inference_seconds",
                "Start-up timing of each candidate, seconds per inference.",
                ["variant", "threads", "spinning"],
                registry=registry,
            ),
            frames_skipped=Counter(
                p + "frames_skipped",
                "Fresh frames the CPU or thermal budget left out (not dropped for being busy).",
                ["reason"],
                registry=registry,
            ),
            rate_limit_fps=Gauge(
                p + "rate_limit_fps",
                "Inferences per second the budgets allow now (+Inf: unlimited).",
                registry=registry,
            ),
            cpu_cores=Gauge(p + "cpu_cores", "Process CPU use over the budget window, in cores.", registry=registry),
            thermal_celsius=Gauge(p + "thermal_celsius", "SoC temperature of budget.thermal_zone.", registry=registry),
            thermal_state=Gauge(
                p + "thermal_state",
                "1 for the thermal budget's current state (ok, throttled, critical, unknown).",
                ["state"],
                registry=registry,
            ),
        )
        for reason in ("budget", "thermal"):
            m.frames_skipped.labels(reason=reason)
        m.rate_limit_fps.set(float("inf"))
        m.set_thermal("ok")
        return m

    def set_thermal(self, state: str) -> None:
        for s in THERMAL_STATES:
            self.thermal_state.labels(state=s).set(1 if s == state else 0)


@dataclass
class AgentMetrics:
    registry: CollectorRegistry
    stage_seconds: Histogram
    end_to_end_seconds: Histogram
    frames_processed: Counter
    frames_dropped: Counter
    frames_failed: Counter
    camera_reconnects: Counter
    frames_stale: Counter
    frames_downscaled: Counter
    camera_connected: Gauge
    seconds_since_frame: Gauge
    publish_errors: Counter
    messages_published: Counter
    last_frame_timestamp: Gauge
    fps: Gauge
    ready: Gauge
    model_info: Info
    captures_saved: Counter
    captures_evicted: Counter
    captures_skipped: Counter
    store_bytes: Gauge
    store_files: Gauge
    reloads: Counter
    budget: BudgetMetrics

    @classmethod
    def create(cls, registry: CollectorRegistry) -> AgentMetrics:
        p = "retrofit_"
        m = cls(
            registry=registry,
            stage_seconds=Histogram(
                p + "stage_duration_seconds",
                "Time spent per frame in each pipeline stage.",
                ["stage"],
                buckets=STAGE_BUCKETS,
                registry=registry,
            ),
            end_to_end_seconds=Histogram(
                p + "end_to_end_latency_seconds",
                "Frame capture to tags published.",
                buckets=STAGE_BUCKETS,
                registry=registry,
            ),
            frames_processed=Counter(p + "frames_processed", "Frames labelled and published.", registry=registry),
            frames_dropped=Counter(
                p + "frames_dropped", "Frames overwritten by a newer one before inference.", registry=registry
            ),
            frames_failed=Counter(
                p + "frames_failed", "Frames that could not be processed, by reason.", ["reason"], registry=registry
            ),
            camera_reconnects=Counter(
                p + "camera_reconnects", "Times the source was reopened after a failure or stall.", registry=registry
            ),
            frames_stale=Counter(
                p + "frames_stale",
                "Frames a live source re-delivered or delivered too late (a frozen stream's buffer), dropped.",
                registry=registry,
            ),
            frames_downscaled=Counter(
                p + "frames_downscaled",
                "Frames larger than camera.max_width x max_height, downscaled at capture.",
                registry=registry,
            ),
            camera_connected=Gauge(p + "camera_connected", "1 while the source is open.", registry=registry),
            seconds_since_frame=Gauge(
                p + "seconds_since_frame",
                "Seconds since the source last delivered a fresh frame (since start-up before the first one).",
                registry=registry,
            ),
            publish_errors=Counter(p + "publish_errors", "Messages that could not be sent.", registry=registry),
            messages_published=Counter(
                p + "messages_published", "Messages sent, by topic.", ["topic"], registry=registry
            ),
            last_frame_timestamp=Gauge(
                p + "last_frame_timestamp_seconds",
                "Unix time the last processed frame was captured.",
                registry=registry,
            ),
            fps=Gauge(p + "fps", "Processed frames per second over the last few seconds.", registry=registry),
            ready=Gauge(p + "ready", "1 once the model is loaded and warmed up.", registry=registry),
            model_info=Info(p + "model", "The loaded model bundle and host.", registry=registry),
            captures_saved=Counter(
                p + "captures_saved", "Frames saved to the capture store, by campaign.", ["campaign"], registry=registry
            ),
            captures_evicted=Counter(
                p + "captures_evicted",
                "Saved frames evicted to stay under the store's caps, by campaign.",
                ["campaign"],
                registry=registry,
            ),
            captures_skipped=Counter(
                p + "captures_skipped",
                "Frames a campaign wanted but did not save, by campaign and reason.",
                ["campaign", "reason"],
                registry=registry,
            ),
            store_bytes=Gauge(p + "store_bytes", "Bytes in the capture store.", registry=registry),
            store_files=Gauge(
                p + "store_files", "Saved frames (image + sidecar pairs) in the store.", registry=registry
            ),
            reloads=Counter(
                p + "reloads", "SIGHUP reloads of bundle and config, by result.", ["result"], registry=registry
            ),
            budget=BudgetMetrics.create(registry),
        )
        for stage in STAGES:  # export every series from the first scrape
            m.stage_seconds.labels(stage=stage)
        for topic in ("tags", "events", "status", "captures"):
            m.messages_published.labels(topic=topic)
        for reason in ("bad_frame", "inference_error", "read_error"):
            m.frames_failed.labels(reason=reason)
        for result in ("ok", "failed"):
            m.reloads.labels(result=result)
        return m

    def set_model(self, model_id: str, version: str, trained: bool, camera: str) -> None:
        self.model_info.info(
            {
                "model_id": model_id,
                "bundle_version": version,
                "trained": str(trained).lower(),
                "camera": camera,
                "machine": platform.machine(),
            }
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, Thread]:
    """Start the /metrics HTTP server on a daemon thread; raise PublishError if bind fails."""
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise PublishError(f"metrics address {host}:{port}: cannot bind ({e.strerror or e})") from None
