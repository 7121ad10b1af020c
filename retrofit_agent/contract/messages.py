"""Messages the daemon publishes over ZeroMQ, as pydantic models.

Every message is multipart ``[topic, json]``. The JSON Schema of all topics is exported to
``deploy/messages.schema.json`` (``retrofit-agent schema``); a test keeps it current.
Bump :data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

import json
import re
import socket
from datetime import datetime, timezone
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 3  # 2: run_id and vehicle on every message, seq on status; 3: regions on tags
TOPIC_TAGS: Final = "tags"
TOPIC_EVENTS: Final = "events"
TOPIC_STATUS: Final = "status"
TOPIC_CAPTURES: Final = "captures"
TOPICS = (TOPIC_TAGS, TOPIC_EVENTS, TOPIC_STATUS, TOPIC_CAPTURES)


Health = Literal["waiting_for_camera", "ok", "degraded"]


def utc_iso(ts: float | None = None) -> str:
    """Unix time (now if None) as the messages and sidecars write it: UTC, ISO 8601, ms, 'Z'."""
    when = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


VEHICLE_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"  # safe as one MQTT topic level and one object-key part


def host_vehicle_id() -> str:
    """The vehicle id when none is configured: the host name, reduced to what VEHICLE_PATTERN allows."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", socket.gethostname()).strip("-.")[:64]
    return name or "vehicle"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Identified(_Msg):
    """What every message carries so that a consumer can tell streams apart: a restart (``seq``
    back to 0 under a new ``run_id``) from a loss (a gap in ``seq`` within one ``run_id``)."""

    run_id: str = Field(description="Random id drawn at each daemon start; seq counters restart with it.")
    vehicle: str = Field(description="Vehicle id from the daemon's config (publish.vehicle).")


class TagOut(_Msg):
    group: str
    label: str
    score: float = Field(description="Probability within the group, after smoothing.")


class RegionOut(_Msg):
    """Where an active tag of a localized label is: cells of the model's feature map scored
    against the bank, joined into a box."""

    group: str
    label: str
    score: float = Field(ge=0, le=1, description="The best cell's probability within the group.")
    box: tuple[float, float, float, float] = Field(
        description="x0, y0, x1, y1 normalised to the original frame (0,0 top-left; 1,1 bottom-right)."
    )


class Latency(_Msg):
    """Per-stage latencies of this frame, in milliseconds."""

    capture_wait_ms: float = Field(description="Time the frame loop waited for this frame.")
    preprocess_ms: float
    inference_ms: float
    labelling_ms: float
    regions_ms: float = Field(0.0, description="Cells scored and joined into regions; 0 without regions.")
    end_to_end_ms: float = Field(description="Frame capture → message ready to send.")


class TagsMessage(_Identified):
    topic: Literal["tags"] = TOPIC_TAGS
    schema_version: int = SCHEMA_VERSION
    seq: int = Field(ge=0, description="Per-process message counter, monotonic, no gaps on this topic.")
    frame_id: int = Field(ge=0, description="Index of the frame delivered by the source.")
    camera: str
    captured_at: str = Field(description="UTC wall-clock capture time, ISO 8601.")
    model: str = Field(description="Model id, name@version.")
    tags: list[TagOut] = Field(description="Tags that are on.")
    top: list[TagOut] = Field(description="Each group's most probable label.")
    regions: list[RegionOut] = Field(
        default_factory=list,
        description="Boxes for active tags of localized labels (schema 3); empty when the model has no cell output.",
    )
    latency: Latency
    published_at: str | None = Field(
        None, description="UTC wall-clock time the message was sent, ISO 8601 (same clock as captured_at)."
    )


class EventMessage(_Identified):
    topic: Literal["events"] = TOPIC_EVENTS
    schema_version: int = SCHEMA_VERSION
    seq: int = Field(ge=0, description="Per-process event counter.")
    frame_id: int = Field(ge=0)
    camera: str
    at: str = Field(description="UTC wall-clock time of the frame that caused it, ISO 8601.")
    model: str
    event: Literal["tag_on", "tag_off"]
    tag: TagOut


class StatusMessage(_Identified):
    topic: Literal["status"] = TOPIC_STATUS
    schema_version: int = SCHEMA_VERSION
    seq: int = Field(ge=0, description="Per-process status counter.")
    at: str
    camera: str
    model: str
    trained: bool = Field(description="False when the bundle's weights are seeded, not trained.")
    health: Health = Field(
        description="'waiting_for_camera' until the source first delivers a frame; 'degraded' while a source "
        "that did deliver is lost, frozen or reconnecting; 'ok' otherwise."
    )
    machine: str = Field(description="platform.machine() of the host, e.g. 'aarch64'.")
    frames_processed: int
    fps: float
    tags: list[TagOut] = Field(description="Tags that are on now.")
    variant: str | None = Field(
        None, description="Model variant, threads and spinning timed fastest at start-up, e.g. 'int8/2t/nospin'."
    )
    thermal: Literal["ok", "throttled", "critical", "unknown"] | None = Field(
        None, description="Thermal budget state; null without a temperature sensor."
    )


class CaptureMessage(_Identified):
    topic: Literal["captures"] = TOPIC_CAPTURES
    schema_version: int = SCHEMA_VERSION
    seq: int = Field(ge=0, description="Per-process capture counter.")
    campaign: str
    path: str = Field(description="Absolute path of the saved JPEG.")
    sidecar: str = Field(description="Absolute path of its JSON sidecar (written last).")
    bytes: int = Field(ge=0, description="Size of image and sidecar together.")
    role: Literal["before", "trigger", "after"]
    offset: int = Field(description="Processed frames relative to the trigger frame.")
    frame_id: int = Field(ge=0)
    camera: str
    captured_at: str
    model: str


def json_schema() -> dict[str, Any]:
    """One JSON Schema document with a definition per topic."""
    defs: dict[str, Any] = {}
    for model in (TagsMessage, EventMessage, StatusMessage, CaptureMessage):
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[model.__name__] = schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "retrofit-agent ZeroMQ messages",
        "description": f"Multipart [topic, JSON] messages, schema_version {SCHEMA_VERSION}.",
        "oneOf": [{"$ref": f"#/$defs/{m}"} for m in ("TagsMessage", "EventMessage", "StatusMessage", "CaptureMessage")],
        "$defs": defs,
    }


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
