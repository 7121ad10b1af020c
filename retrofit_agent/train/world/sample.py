"""Seeded scenes: labels drawn independently per group, instances placed so each is legible.

Groups are sampled independently, with two realistic exclusions: a parking lot is never in
a tunnel or on a bridge (a lot is its own place), and the scene weights make up for that so
every scene label stays frequent. Object instances are sized by the fraction of the image
height they should cover (not by a depth range), so a label is as visible through a
68-degree lens as through a 42-degree one; placement retries until the instance is in
frame, unoccluded and clear of fog (see :mod:`.annotate` for what "legible" means).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from retrofit_agent.train.world.labels import RENDERABLE, LabelSpace, WorldError
from retrofit_agent.train.world.place import place_things
from retrofit_agent.train.world.scene import Camera, Conditions, Scene, Sensor

# Label weights inside each group (renormalised over the labels the prompts file keeps).
WEIGHTS: dict[str, dict[str, float]] = {
    "pedestrians": {"present": 0.5, "absent": 0.5},
    "cyclists": {"present": 0.45, "absent": 0.55},
    "traffic_light": {"red": 0.22, "yellow": 0.22, "green": 0.22, "none": 0.34},
    "signs": {"stop": 0.22, "speed_limit": 0.22, "yield": 0.22, "none": 0.34},
    "vehicles": {"car": 0.2, "truck": 0.2, "bus": 0.2, "motorcycle": 0.2, "none": 0.2},
}
# Haze distance by weather (metres); clear and cloudy air get 400-900 m.
FOG_RANGE_M = {"fog": (14.0, 28.0), "rain": (120.0, 250.0), "snow": (90.0, 200.0)}
# Scene given road type: parking lots only hold open road or road works, so the other roads
# carry more tunnels and bridges to keep every scene label above ~20%.
SCENE_WEIGHTS = {
    "parking": {"open_road": 0.55, "construction_zone": 0.45},
    "other": {"tunnel": 0.28, "construction_zone": 0.22, "bridge": 0.28, "open_road": 0.22},
}


class SceneConflict(WorldError):
    """Fixed labels that cannot hold together (a parking lot inside a tunnel)."""


def _choice(rng: np.random.Generator, weights: Mapping[str, float], allowed: tuple[str, ...]) -> str:
    names = [n for n in weights if n in allowed] or list(allowed)
    p = np.array([weights.get(n, 1.0) for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_conditions(rng: np.random.Generator, space: LabelSpace, fixed: Mapping[str, str]) -> dict[str, str]:
    """One label per group (every renderable group, also those the prompts file omits)."""
    groups = {g: space.groups.get(g, labels) for g, labels in RENDERABLE.items()}
    out: dict[str, str] = {}
    out["road_type"] = fixed.get("road_type") or _choice(rng, {}, groups["road_type"])
    key = "parking" if out["road_type"] == "parking" else "other"
    allowed_scenes = tuple(s for s in groups["scene"] if s in SCENE_WEIGHTS[key])
    if "scene" in fixed and fixed["scene"] not in SCENE_WEIGHTS[key]:
        raise SceneConflict(f"a {out['road_type']} road cannot be in scene {fixed['scene']!r}")
    out["scene"] = fixed.get("scene") or _choice(rng, SCENE_WEIGHTS[key], allowed_scenes)
    for g in ("weather", "time_of_day"):
        out[g] = fixed.get(g) or _choice(rng, {}, groups[g])
    for g, w in WEIGHTS.items():
        out[g] = fixed.get(g) or _choice(rng, w, groups[g])
    return out


def sample_scene(
    seed: int, width: int, height: int, space: LabelSpace, fixed: Mapping[str, str] | None = None
) -> Scene:
    """The scene for ``seed`` at ``width`` x ``height``; ``fixed`` pins labels by group."""
    rng = np.random.default_rng(seed)
    labels = sample_conditions(rng, space, fixed or {})
    cond = _road_conditions(rng, labels)
    camera = Camera(
        horizon=float(rng.uniform(0.33, 0.52)),
        vanish_x=float(rng.uniform(0.42, 0.58)),
        vfov_deg=float(rng.uniform(42, 66)),
        height_m=float(rng.uniform(1.2, 1.7) if rng.random() < 0.8 else rng.uniform(1.7, 2.3)),
    )
    night = labels["time_of_day"] == "night"
    sensor = Sensor(
        noise=float(rng.uniform(0, 6) + (rng.uniform(1, 4) if night else 0)),
        blur_px=float(rng.uniform(1, 4) if rng.random() < 0.4 else 0.0),
        blur_angle_deg=float(rng.uniform(0, 180)),
        gain=tuple(float(g) for g in rng.uniform(0.9, 1.1, 3)),  # type: ignore[arg-type]
        exposure=float(rng.uniform(0.85, 1.15)),
        jpeg_quality=int(rng.integers(40, 96)),
        defocus_px=float(rng.uniform(0.3, 1.0) if rng.random() < 0.3 else 0.0),
    )
    scene = Scene(seed=seed, width=width, height=height, conditions=cond, camera=camera, sensor=sensor)
    return replace(scene, things=tuple(place_things(rng, scene, labels)))


def _road_conditions(rng: np.random.Generator, labels: dict[str, str]) -> Conditions:
    road = labels["road_type"]
    if road == "highway":
        lanes, lw = int(rng.integers(3, 5)), float(rng.uniform(3.4, 3.8))
        ego_lane = int(rng.integers(0, lanes))
        offset = (lanes / 2 - ego_lane - 0.5) * lw
    elif road == "urban":
        lanes, lw = int(rng.choice([2, 4])), float(rng.uniform(3.0, 3.5))
        offset = -lw * (0.5 if lanes == 2 else rng.choice([0.5, 1.5]))  # drive on the right
    elif road == "rural":
        lanes, lw = 2, float(rng.uniform(2.6, 3.0))
        offset = -0.5 * lw
    else:  # parking: one wide aisle between rows of bays
        lanes, lw = 2, float(rng.uniform(3.0, 3.6))
        offset = 0.0
    offset += float(rng.normal(0, 0.25))
    lo, hi = FOG_RANGE_M.get(labels["weather"], (400.0, 900.0))  # clear air still hazes the horizon
    fog = float(rng.uniform(lo, hi))
    tunnel_start, tunnel_length = 0.0, 0.0
    if labels["scene"] == "tunnel":
        inside = rng.random() < 0.65
        tunnel_start = -float(rng.uniform(5, 200)) if inside else float(rng.uniform(14, 32))
        tunnel_length = float(rng.uniform(100, 500)) - min(0.0, tunnel_start)  # exit at least 100 m ahead
        if inside:
            fog = max(fog, 300.0)  # the weather stays outside
    return Conditions(
        weather=labels["weather"],
        time_of_day=labels["time_of_day"],
        road_type=road,
        scene=labels["scene"],
        lanes=lanes,
        lane_width_m=lw,
        road_offset_m=offset,
        curvature=0.0 if road == "parking" else float(rng.uniform(-1, 1) * 0.0012),
        fog_m=float(fog),
        tunnel_start_m=tunnel_start,
        tunnel_length_m=tunnel_length,
        odometer_m=float(rng.uniform(0, 2000)),
        layout_seed=int(rng.integers(0, 2**31 - 1)),
        palette=tuple(int(v) for v in rng.integers(0, 1000, 8)),
        precipitation=float(rng.uniform(0.2, 1.4)),
    )
