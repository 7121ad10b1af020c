"""Ground truth from a scene: boxes for every instance in view and one label per group.

Object groups are decided by what a viewer could recognise, not by what was sampled: an
instance is *legible* when it is mostly inside the frame, not hidden behind nearer solid
objects, at least :data:`MIN_HEIGHT` of the image tall and not washed out by fog. A group
with a legible instance gets its label; a group whose instances are all illegible gets
``null`` (undecidable: a distant speck may or may not be a stop sign); a group with no
instance in view gets its empty label. The sampler places instances so that every sampled
label is legible, and a drive's frames are labelled frame by frame as things approach and
pass.

Conditions: inside a tunnel the weather and the time of day cannot be seen, so both are
``null``; before the portal (an approach) they are observable. A construction zone needs a
legible cone or barrier, as a viewer would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from retrofit_agent.train.world.labels import EMPTY, LabelSpace
from retrofit_agent.train.world.records import BoxRecord
from retrofit_agent.train.world.scene import KIND_GROUP, Projection, Scene, Thing, tunnel_section

MIN_HEIGHT = 0.06  # of the image height
MIN_VISIBLE = 0.6  # fraction of the box inside the frame
MAX_OCCLUDED = 0.4  # fraction of the box covered by nearer solid things
MAX_FOG = 0.6  # fog blend factor at the instance's depth
_SOLID = frozenset({"vehicle", "pedestrian", "cyclist", "barrier"})


@dataclass(frozen=True)
class Annotation:
    labels: dict[str, str | None]
    boxes: tuple[BoxRecord, ...]
    null_reasons: dict[str, str]  # why each null label is null (see NULL_REASONS)


# Why a group's truth is null; written beside the labels so an evaluator can tell a rule
# (weather cannot be seen inside a tunnel) from a marginal picture (a speck of a sign).
NULL_REASONS = {
    "inside_tunnel": "weather and time of day cannot be seen inside a tunnel",
    "illegible": "every instance is too small, mostly hidden, cut off by the frame or lost in fog",
    "no_cones_in_view": "a construction zone between its cones: none legible in this frame",
}


TUNNEL_AIR_M = 300.0  # haze inside a tunnel: the weather stays outside


def fog_factor(z: float, fog_m: float) -> float:
    return 1.0 - math.exp(-max(0.0, z) / fog_m)


def inside_tunnel(scene: Scene) -> bool:
    return scene.conditions.scene == "tunnel" and scene.conditions.tunnel_start_m <= 0


def fog_distance(scene: Scene) -> float:
    return max(scene.conditions.fog_m, TUNNEL_AIR_M) if inside_tunnel(scene) else scene.conditions.fog_m


def behind_portal(scene: Scene, proj: Projection, t: Thing, box: tuple[float, float, float, float]) -> bool:
    """True when a tunnel is still ahead and ``t`` stands beyond its portal, outside the
    opening: the hill and the portal face hide it."""
    c = scene.conditions
    if c.scene != "tunnel" or c.tunnel_start_m <= 0 or t.z <= c.tunnel_start_m:
        return False
    wl, wr, hc = tunnel_section(c)
    z = c.tunnel_start_m
    x0, y0, x1, y1 = box
    return x0 < proj.px(wl, z) or x1 > proj.px(wr, z) or y0 < proj.py(hc - 1.0, z)


def annotate(scene: Scene, space: LabelSpace) -> Annotation:
    proj = Projection.of(scene)
    W, H = scene.width, scene.height
    raw = [(t, proj.box(t)) for t in scene.things]
    boxes: list[BoxRecord] = []
    seen: dict[str, list[bool]] = {}
    for t, (x0, y0, x1, y1) in raw:
        cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(W), x1), min(float(H), y1)
        if cx1 - cx0 < 1 or cy1 - cy0 < 1:
            continue  # out of frame: not in the picture at all
        area = max(1e-6, (x1 - x0) * (y1 - y0))
        visible = (cx1 - cx0) * (cy1 - cy0) / area
        occluded = 1.0 if behind_portal(scene, proj, t, (x0, y0, x1, y1)) else _occlusion(t, (cx0, cy0, cx1, cy1), raw)
        legible = (
            visible >= MIN_VISIBLE
            and occluded <= MAX_OCCLUDED
            and (y1 - y0) >= MIN_HEIGHT * H
            and fog_factor(t.z, fog_distance(scene)) <= MAX_FOG
        )
        group = KIND_GROUP[t.kind]
        label = "construction_zone" if group == "scene" else t.label
        seen.setdefault(group, []).append(legible)
        ix0, iy0, ix1, iy1 = int(cx0), int(cy0), int(math.ceil(cx1)), int(math.ceil(cy1))
        boxes.append(
            BoxRecord(
                kind=t.kind,
                group=group,
                label=label,
                xyxy=(ix0, iy0, ix1, iy1),
                xyxy_norm=(round(ix0 / W, 4), round(iy0 / H, 4), round(ix1 / W, 4), round(iy1 / H, 4)),
                depth_m=round(t.z, 2),
                legible=legible,
            )
        )
    labels, reasons = _labels(scene, space, boxes, seen)
    return Annotation(labels, tuple(boxes), reasons)


def _labels(
    scene: Scene, space: LabelSpace, boxes: list[BoxRecord], seen: dict[str, list[bool]]
) -> tuple[dict[str, str | None], dict[str, str]]:
    c = scene.conditions
    hidden = inside_tunnel(scene)
    labels: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    for group in space.groups:
        if group in ("weather", "time_of_day"):
            labels[group] = None if hidden else getattr(c, group)
            if hidden:
                reasons[group] = "inside_tunnel"
        elif group == "road_type":
            labels[group] = c.road_type
        elif group == "scene":
            if c.scene == "construction_zone" and not any(seen.get("scene", [])):
                labels[group], reasons[group] = None, "no_cones_in_view"
            else:
                labels[group] = c.scene
        else:
            legible = [b.label for b in boxes if b.group == group and b.legible]
            if legible:
                labels[group] = legible[0]  # one state/type per picture (sampler guarantees it)
            elif seen.get(group):
                labels[group], reasons[group] = None, "illegible"
            else:
                labels[group] = EMPTY[group]
    return labels, reasons


def _occlusion(t: Thing, box: tuple[float, float, float, float], raw: list) -> float:
    x0, y0, x1, y1 = box
    area = max(1e-6, (x1 - x0) * (y1 - y0))
    covered = 0.0
    for other, (ox0, oy0, ox1, oy1) in raw:
        if other is t or other.kind not in _SOLID or other.z >= t.z:
            continue
        w = min(x1, ox1) - max(x0, ox0)
        h = min(y1, oy1) - max(y0, oy0)
        if w > 0 and h > 0:
            covered += w * h
    return min(1.0, covered / area)
