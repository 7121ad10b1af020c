"""The daemon's messages, assembled in one place: it owns the per-topic seq counters and the
camera's identity, so the frame loop only says what happened.

Each topic has its own gap-free ``seq`` per process: a gap seen by a subscriber is a message
ZeroMQ dropped for it; ``seq`` starting over at 0 under a new ``run_id`` (drawn here, once per
daemon start) is a restart. Every message also names the ``vehicle``.
"""

from __future__ import annotations

import platform
import uuid
from collections.abc import Sequence

from retrofit_agent.contract.messages import (
    TOPIC_CAPTURES,
    TOPIC_EVENTS,
    TOPIC_STATUS,
    TOPIC_TAGS,
    CaptureMessage,
    EventMessage,
    Health,
    Latency,
    RegionOut,
    StatusMessage,
    TagOut,
    TagsMessage,
    host_vehicle_id,
    utc_iso,
)
from retrofit_agent.contract.regions import Region
from retrofit_agent.daemon.collect.collector import SavedCapture
from retrofit_agent.daemon.labelling import LabelResult, Tag
from retrofit_agent.daemon.publish import Publisher
from retrofit_agent.daemon.thermal import ThermalState


def tags_out(tags: list[Tag]) -> list[TagOut]:
    return [TagOut(group=t.group, label=t.label, score=t.score) for t in tags]


class Outputs:
    def __init__(
        self, publisher: Publisher, camera: str, vehicle: str | None = None, run_id: str | None = None
    ) -> None:
        self.publisher = publisher
        self.camera = camera
        self.vehicle = vehicle or host_vehicle_id()
        self.run_id = run_id or uuid.uuid4().hex
        self.tags_seq = 0
        self.events_seq = 0
        self.captures_seq = 0
        self.status_seq = 0

    def tags(
        self,
        frame_id: int,
        captured_wall: float,
        model: str,
        result: LabelResult,
        latency: Latency,
        regions: Sequence[Region] = (),
    ) -> int:
        """Publish a frame's tags (and the regions of its localized ones); returns the message's seq."""
        seq = self.tags_seq
        self.publisher.send(
            TOPIC_TAGS,
            TagsMessage(
                run_id=self.run_id,
                vehicle=self.vehicle,
                seq=seq,
                frame_id=frame_id,
                camera=self.camera,
                captured_at=utc_iso(captured_wall),
                model=model,
                tags=tags_out(result.tags),
                top=tags_out(result.tops),
                regions=[RegionOut(group=r.group, label=r.label, score=r.score, box=r.box) for r in regions],
                latency=latency,
                published_at=utc_iso(),
            ),
        )
        self.tags_seq += 1
        return seq

    def event(self, frame_id: int, captured_wall: float, model: str, tag: Tag, on: bool) -> None:
        self.publisher.send(
            TOPIC_EVENTS,
            EventMessage(
                run_id=self.run_id,
                vehicle=self.vehicle,
                seq=self.events_seq,
                frame_id=frame_id,
                camera=self.camera,
                at=utc_iso(captured_wall),
                model=model,
                event="tag_on" if on else "tag_off",
                tag=tags_out([tag])[0],
            ),
        )
        self.events_seq += 1

    def capture(self, saved: SavedCapture, model: str) -> None:
        job, item = saved.job, saved.item
        self.publisher.send(
            TOPIC_CAPTURES,
            CaptureMessage(
                run_id=self.run_id,
                vehicle=self.vehicle,
                seq=self.captures_seq,
                campaign=job.campaign.name,
                path=str(item.image.resolve()),
                sidecar=str(item.sidecar.resolve()),
                bytes=item.bytes,
                role=job.role,
                offset=job.offset,
                frame_id=job.record.frame_id,
                camera=self.camera,
                captured_at=utc_iso(job.record.captured_wall),
                model=model,
            ),
        )
        self.captures_seq += 1

    def status(
        self,
        model: str,
        trained: bool,
        health: Health,
        frames_processed: int,
        fps: float,
        tags: list[Tag],
        variant: str | None = None,
        thermal: ThermalState | None = None,
    ) -> None:
        self.publisher.send(
            TOPIC_STATUS,
            StatusMessage(
                run_id=self.run_id,
                vehicle=self.vehicle,
                seq=self.status_seq,
                at=utc_iso(),
                camera=self.camera,
                model=model,
                trained=trained,
                health=health,
                machine=platform.machine(),
                frames_processed=frames_processed,
                fps=round(fps, 2),
                tags=tags_out(tags),
                variant=variant,
                thermal=thermal,
            ),
        )
        self.status_seq += 1
