"""A drive: named segments rendered into one clip, with per-frame ground truth.

A segment is named by hyphen-separated label words, e.g. ``urban-dusk-pedestrians-red-bus``
(see :data:`TOKENS`). Weather, time of day and road type not named are drawn from the seed;
a scene not named is an open road; object groups not named are empty. Within a segment the
world is coherent: the camera drives on (lane marks and props scroll, the odometer counts;
it waits at a red light and eases off for amber), static things (signs, lights, cones,
parked cars) approach and grow, people walk, traffic keeps pace, lights keep their state; a thing that drops out behind the camera comes back
far ahead, so a segment keeps showing its labels. Segments are joined by cuts.

Ground truth is per frame (:mod:`.annotate`): a sign that has not come close enough yet is
``null``, and ``none`` once it has passed out of the picture.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import cv2

from retrofit_agent.train.world.annotate import MIN_HEIGHT, annotate
from retrofit_agent.train.world.labels import EMPTY, LabelSpace, WorldError
from retrofit_agent.train.world.records import FrameRecord
from retrofit_agent.train.world.render import render
from retrofit_agent.train.world.sample import sample_scene
from retrofit_agent.train.world.scene import Projection, Scene, Thing

# Segment words → (group, label). Label names work as words, plus a few aliases.
TOKENS: dict[str, tuple[str, str]] = {
    **{w: ("weather", w) for w in ("clear", "cloudy", "rain", "snow", "fog")},
    **{w: ("time_of_day", w) for w in ("day", "dusk", "night")},
    **{w: ("road_type", w) for w in ("highway", "urban", "rural", "parking")},
    "city": ("road_type", "urban"),
    "town": ("road_type", "urban"),
    "country": ("road_type", "rural"),
    **{w: ("scene", w) for w in ("tunnel", "bridge", "construction_zone", "open_road")},
    "construction": ("scene", "construction_zone"),
    "open": ("scene", "open_road"),
    "pedestrians": ("pedestrians", "present"),
    "people": ("pedestrians", "present"),
    "cyclists": ("cyclists", "present"),
    "cyclist": ("cyclists", "present"),
    **{w: ("traffic_light", w) for w in ("red", "yellow", "green")},
    "amber": ("traffic_light", "yellow"),
    **{w: ("signs", w) for w in ("stop", "speed_limit", "yield")},
    "speed": ("signs", "speed_limit"),
    **{w: ("vehicles", w) for w in ("car", "truck", "bus", "motorcycle")},
}

# Clear daytime highway -> tunnel -> dusk in town -> night rain -> rural fog -> snowy bridge
# -> road works -> parking at night -> snowy town: every label of every group at least once.
DEFAULT_PLAN: tuple[str, ...] = (
    "highway-clear-day-car-speed_limit",
    "highway-tunnel-cloudy-day-truck-yellow",
    "urban-cloudy-dusk-pedestrians-red-bus-stop",
    "urban-rain-night-cyclists-green-car",
    "rural-fog-day-motorcycle-yield",
    "rural-snow-dusk-bridge-pedestrians",
    "highway-cloudy-day-construction-truck-speed_limit",
    "parking-clear-night-bus-pedestrians",
    "urban-snow-day-cyclists-yellow-motorcycle-yield",
)
SPEED_MPS = {"highway": 20.0, "rural": 13.0, "urban": 8.0, "parking": 3.0}
VIDEO_PRECIPITATION = 0.2
VIDEO_DEFOCUS_PX = 0.6
_SIGNAL_SPEED = {"red": 0.0, "yellow": 4.0}  # waiting at a red light; easing off for amber
_WALK, _RIDE = 1.3, 4.5


class SegmentError(WorldError):
    """A segment name with an unknown or contradictory word."""


@dataclass(frozen=True)
class Segment:
    name: str
    fixed: dict[str, str]


def parse_segment(name: str, space: LabelSpace) -> Segment:
    """``"urban-dusk-red"`` → fixed labels; unknown words and two labels for one group are errors."""
    fixed: dict[str, str] = {}
    words = [w for w in name.strip().lower().split("-") if w]
    if not words:
        raise SegmentError(f"empty segment name {name!r}")
    for word in words:
        if word not in TOKENS:
            raise SegmentError(f"unknown word {word!r} in segment {name!r} (known: {', '.join(sorted(TOKENS))})")
        group, label = TOKENS[word]
        if group in fixed and fixed[group] != label:
            raise SegmentError(f"segment {name!r} names two {group} labels: {fixed[group]!r} and {label!r}")
        if group in space.groups and label not in space.groups[group]:
            raise SegmentError(f"segment {name!r}: {group}.{label} is not a label of the prompts file")
        fixed[group] = label
    fixed.setdefault("scene", "open_road")
    for group, empty in EMPTY.items():
        fixed.setdefault(group, empty)
    if fixed.get("road_type") == "parking" and fixed["scene"] in ("tunnel", "bridge"):
        raise SegmentError(f"segment {name!r}: a parking lot cannot be in a {fixed['scene']}")
    return Segment(name=name.strip(), fixed=fixed)


def parse_plan(names: list[str], space: LabelSpace) -> list[Segment]:
    if not names:
        raise SegmentError("no segments given")
    return [parse_segment(n, space) for n in names]


@dataclass(frozen=True)
class DriveFrame:
    index: int
    time_s: float
    segment: Segment
    segment_index: int
    scene: Scene


def frames(
    plan: list[Segment], seed: int, fps: float, seconds: float, size: tuple[int, int], space: LabelSpace
) -> Iterator[DriveFrame]:
    """Every frame's scene, in order (render and annotate them as needed)."""
    per_segment = max(1, int(round(seconds * fps)))
    index = 0
    for k, segment in enumerate(plan):
        base = sample_scene(seed * 1000 + k, size[0], size[1], space, segment.fixed)
        # Stopping for a red light and slowing for amber keeps the light in view, as it would.
        speed = min(SPEED_MPS[base.conditions.road_type], _SIGNAL_SPEED.get(segment.fixed["traffic_light"], 99.0))
        if base.conditions.scene == "tunnel":  # start outside, drive in a third of the way through
            start = max(15.0, speed * seconds * 0.35)
            base = replace(
                base,
                conditions=replace(
                    base.conditions,
                    tunnel_start_m=start,
                    fog_m=_outside_fog(base),
                    tunnel_length_m=max(base.conditions.tunnel_length_m, start + 200.0),
                ),
            )
        # Light rain or snow: every streak is news to a video coder, and a drive at picture
        # densities costs ~8 MB per rainy segment. Still within the pictures range (0.2-1.4).
        # Likewise a video coder smooths away sensor noise and fine texture: soften the frames
        # as a real dashcam file is soft, or the default drive takes ~25 MB instead of ~7.
        base = replace(
            base,
            conditions=replace(base.conditions, precipitation=VIDEO_PRECIPITATION),
            sensor=replace(base.sensor, noise=min(base.sensor.noise, 1.0), defocus_px=VIDEO_DEFOCUS_PX),
        )
        for j in range(per_segment):
            t = j / fps
            yield DriveFrame(index, index / fps, segment, k, _at(base, t, speed, seed * 1_000_000 + index))
            index += 1


def _outside_fog(scene: Scene) -> float:
    # A tunnel segment shows the outside first, so its haze must be the weather's, not the
    # clean air the sampler gives a picture taken inside.
    return {"fog": 22.0, "rain": 180.0, "snow": 150.0}.get(scene.conditions.weather, 600.0)


def _at(base: Scene, t: float, speed: float, frame_seed: int) -> Scene:
    c = base.conditions
    cond = replace(
        c,
        odometer_m=c.odometer_m + speed * t,
        clock_s=t,
        tunnel_start_m=c.tunnel_start_m - speed * t if c.scene == "tunnel" else c.tunnel_start_m,
    )
    half = c.lanes * c.lane_width_m / 2
    road = (c.road_offset_m - half, c.road_offset_m + half)
    proj = Projection.of(base)
    things = tuple(_move(th, t, speed, road, _window(th, proj, c.fog_m)) for th in base.things)
    return replace(base, seed=frame_seed, conditions=cond, things=things)


def _wrap(value: float, lo: float, hi: float) -> float:
    return lo + (value - lo) % (hi - lo)


def _window(th: Thing, proj: Projection, fog_m: float) -> tuple[float, float]:
    """The depths over which ``th`` is in frame and large enough to be legible. A thing that
    leaves it (passed, or too far) re-enters at the other end: roads repeat their signs,
    cones and lights, and a segment keeps showing its labels instead of emptying out."""
    reach = (abs(th.x) + th.width_m / 2) * proj.f / max(1.0, min(proj.cx, proj.width - proj.cx))
    above = proj.f * max(0.0, th.elevation_m + th.height_m - proj.cam_h) / max(1.0, proj.horizon_y)
    lo = max(1.5, 1.05 * proj.near_z(), reach, above)
    hi = proj.f * th.height_m / (1.15 * MIN_HEIGHT * proj.height)
    hi = min(hi, 0.9 * fog_m)  # no point approaching from deep inside a fog bank
    return lo, max(hi, lo + 8.0)


def _move(th: Thing, t: float, ego: float, road: tuple[float, float], window: tuple[float, float]) -> Thing:
    """Where a thing is ``t`` seconds into its segment (camera coordinates)."""
    xl, xr = road
    dz, dx, steps = -ego * t, 0.0, 0.0
    if th.kind == "pedestrian":
        steps = 1.8 * t
        if th.view == "side":
            dx = (-1 if th.facing_left else 1) * _WALK * t
        else:
            dz += (_WALK if th.colours[3][2] % 2 else -_WALK) * t
    elif th.kind == "cyclist":
        steps = 1.2 * t
        if xl < th.x < xr - 0.2:  # crossing the road
            dx = (-1 if th.facing_left else 1) * _RIDE * t
        else:
            dz += _RIDE * t
    elif th.kind == "vehicle":
        steps = t
        if th.view == "rear":  # traffic ahead keeps pace, drifting nearer and back
            dz = 2.5 * (math.sin(2 * math.pi * (t / 9.0 + th.phase)) - math.sin(2 * math.pi * th.phase))
        elif th.view == "front":
            dz = -(ego + 8.0) * t
        elif xl < th.x < xr:  # crossing at a junction ahead
            dx = (-1 if th.facing_left else 1) * 6.0 * t
    x = _wrap(th.x + dx, xl - 4.0, xr + 4.0) if dx else th.x
    z = _wrap(th.z + dz, *window) if dz else th.z
    return replace(th, x=x, z=z, phase=(th.phase + steps) % 1.0)


def write_clip(
    path: Path, plan: list[Segment], seed: int, fps: float, seconds: float, size: tuple[int, int], space: LabelSpace
) -> tuple[Path, Path, int]:
    """Write the drive to ``path`` (MPEG-4 Part 2, 'mp4v') and ``path`` with ``.jsonl``
    (one :class:`~.records.FrameRecord` per frame). Returns (clip, sidecar, frames)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_suffix(".jsonl")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise WorldError(f"cannot write video {path} (OpenCV has no 'mp4v' writer here)")
    n = 0
    try:
        with open(sidecar, "w", encoding="utf-8") as out:
            for f in frames(plan, seed, fps, seconds, size, space):
                writer.write(render(f.scene))
                truth = annotate(f.scene, space)
                out.write(
                    FrameRecord(
                        frame=f.index,
                        time_s=round(f.time_s, 4),
                        segment=f.segment.name,
                        segment_index=f.segment_index,
                        labels=truth.labels,
                        null_reasons=truth.null_reasons,
                        boxes=list(truth.boxes),
                    ).model_dump_json()
                    + "\n"
                )
                n += 1
    finally:
        writer.release()
    return path, sidecar, n
