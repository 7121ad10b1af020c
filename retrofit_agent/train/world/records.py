"""The JSONL lines the world writes (``captions.jsonl`` and a clip's sidecar).

Ground truth has one entry per group of the prompts file. ``null`` means "not decidable
from this picture, skip it when scoring": weather and time of day inside a tunnel, or an
object group whose only instances are too small, too occluded, too deep in fog or cut off
by the frame edge to be recognised (see :mod:`.annotate`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BoxRecord(_Record):
    kind: str = Field(description="pedestrian, cyclist, traffic_light, sign, vehicle, cone or barrier")
    group: str = Field(description="the label group this instance decides ('scene' for cones and barriers)")
    label: str = Field(description="'present' for people, else the state or type: red, stop, bus, construction_zone")
    xyxy: tuple[int, int, int, int] = Field(
        description="pixel box x0, y0, x1, y1 (clipped to the image, x1/y1 exclusive)"
    )
    xyxy_norm: tuple[float, float, float, float] = Field(description="the box divided by width/height, in [0, 1]")
    depth_m: float = Field(description="distance ahead of the camera")
    legible: bool = Field(description="large, visible and clear enough to decide its group's label")


_NULL_REASONS = (
    "group -> why its label is null: 'inside_tunnel' (weather, time of day), 'illegible' (instances "
    "too small, hidden, cut off or fogged), 'no_cones_in_view' (construction zone between cones)"
)


class ImageRecord(_Record):
    file: str = Field(description="image file name, relative to the folder holding captions.jsonl")
    key: str = Field(description="WebDataset sample key in the shards (the file name without extension)")
    caption: str
    labels: dict[str, str | None] = Field(description="group -> label, null where not observable")
    null_reasons: dict[str, str] = Field(default_factory=dict, description=_NULL_REASONS)
    boxes: list[BoxRecord]
    seed: int = Field(description="scene seed: sample_scene(seed, width, height) rebuilds the image exactly")
    width: int
    height: int


class FrameRecord(_Record):
    frame: int = Field(description="frame index in the clip, from 0")
    time_s: float = Field(description="frame time: frame / fps")
    segment: str = Field(description="the drive segment's name, e.g. 'urban-dusk-pedestrians-red'")
    segment_index: int
    labels: dict[str, str | None] = Field(description="group -> label, null where not observable")
    null_reasons: dict[str, str] = Field(default_factory=dict, description=_NULL_REASONS)
    boxes: list[BoxRecord]
