"""What a world picture is made of: frozen, JSON-serialisable scene descriptions.

A :class:`Scene` is everything the renderer needs and nothing else: the world's conditions
(weather, time of day, road, scene), the camera, the sensor's defects and the object
instances in camera coordinates (metres: ``x`` to the right, ``z`` ahead, on a flat
ground). Background props (buildings, trees, lamps, rails) are not listed: they follow
from ``layout_seed`` and the odometer, so a drive scrolls them past coherently.

Frozen dataclasses rather than pydantic models because a drive builds thousands per
second; :data:`SCENE_ADAPTER` validates and dumps them at the JSON boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import TypeAdapter

ThingKind = Literal["pedestrian", "cyclist", "traffic_light", "sign", "vehicle", "cone", "barrier"]
View = Literal["rear", "side", "front"]

# Which label group an instance of each kind decides (cones and barriers mark a
# construction zone, but the scene label comes from the conditions, not from them).
KIND_GROUP: dict[str, str] = {
    "pedestrian": "pedestrians",
    "cyclist": "cyclists",
    "traffic_light": "traffic_light",
    "sign": "signs",
    "vehicle": "vehicles",
    "cone": "scene",
    "barrier": "scene",
}


@dataclass(frozen=True, slots=True)
class Camera:
    """Pinhole camera over flat ground; pitch and yaw are expressed as where the horizon
    and the vanishing point fall in the image, which is what the renderer needs."""

    horizon: float  # horizon row / image height (camera pitch)
    vanish_x: float  # vanishing point column / image width (camera yaw)
    vfov_deg: float  # vertical field of view
    height_m: float  # camera height above the road


@dataclass(frozen=True, slots=True)
class Sensor:
    """Per-image capture defects, so no label can be read off one exact pixel value."""

    noise: float  # gaussian sigma in 8-bit levels
    blur_px: float  # motion blur length
    blur_angle_deg: float
    gain: tuple[float, float, float]  # white balance (B, G, R multipliers)
    exposure: float  # global brightness multiplier
    jpeg_quality: int
    defocus_px: float = 0.0  # gaussian softness (focus, dirty windscreen, a video coder's smoothing)


@dataclass(frozen=True, slots=True)
class Conditions:
    """The world's state. Always complete, even where a group cannot be seen (weather inside
    a tunnel); :func:`~.annotate.annotate` decides what is observable."""

    weather: str
    time_of_day: str
    road_type: str
    scene: str
    lanes: int  # lanes of the carriageway the camera is on
    lane_width_m: float
    road_offset_m: float  # road centre's x relative to the camera
    curvature: float  # lateral drift of the road: x += curvature * z**2
    fog_m: float  # fog visibility scale (large when there is no fog)
    tunnel_start_m: float  # distance to the tunnel portal; <= 0 means inside (tunnel scenes only)
    tunnel_length_m: float  # the exit is at tunnel_start_m + tunnel_length_m
    odometer_m: float  # distance driven: phases lane marks and props in a drive
    layout_seed: int  # background props and palette
    palette: tuple[int, ...]  # small integers picking colour variants per surface
    precipitation: float = 1.0  # density of rain streaks / snowflakes in the air
    clock_s: float = 0.0  # seconds into a drive segment: animates rain and snow


@dataclass(frozen=True, slots=True)
class Thing:
    """One object instance. Its box is ``width_m`` x ``height_m`` standing at ground point
    (x, z), raised by ``elevation_m`` (a sign face on its pole, a light in its housing)."""

    kind: ThingKind
    label: str  # "present" for people, the state/type otherwise ("red", "stop", "bus")
    x: float
    z: float
    width_m: float
    height_m: float
    elevation_m: float = 0.0
    view: View = "rear"
    colours: tuple[tuple[int, int, int], ...] = ()
    phase: float = 0.0  # walking / pedalling cycle in [0, 1)
    number: int = 0  # speed limit shown on the sign
    facing_left: bool = False  # side views: which way it points
    pole_m: float = 0.0  # pole from the ground to the box (signs, lights); 0 = hanging


@dataclass(frozen=True, slots=True)
class Scene:
    """One picture: size, conditions, camera, sensor and object instances."""

    seed: int
    width: int
    height: int
    conditions: Conditions
    camera: Camera
    sensor: Sensor
    things: tuple[Thing, ...] = field(default_factory=tuple)


SCENE_ADAPTER: TypeAdapter[Scene] = TypeAdapter(Scene)


def hash01(*keys: int) -> float:
    """A stable float in [0, 1) from integers (splitmix64): props keyed by (seed, index)
    stay put as the camera drives past them, without storing them."""
    x = 0x9E3779B97F4A7C15
    for k in keys:
        x = (x ^ (k & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return (x >> 11) / float(1 << 53)


def tunnel_section(c: Conditions) -> tuple[float, float, float]:
    """(left wall x, right wall x, ceiling height) of the scene's tunnel: shared by the
    renderer and the annotation, which needs the portal's opening to know what it hides."""
    half = c.lanes * c.lane_width_m / 2
    walk = 1.8 if c.road_type == "urban" else 0.9
    return c.road_offset_m - half - walk, c.road_offset_m + half + walk, 5.2 + 1.2 * hash01(c.layout_seed, 80)


@dataclass(frozen=True, slots=True)
class Projection:
    """Camera-to-pixel mapping for one scene (flat ground, small pitch)."""

    width: int
    height: int
    f: float  # focal length in pixels
    cx: float
    horizon_y: float
    cam_h: float
    curvature: float

    @classmethod
    def of(cls, scene: Scene) -> Projection:
        cam = scene.camera
        f = 0.5 * scene.height / math.tan(math.radians(cam.vfov_deg) / 2)
        return cls(
            scene.width,
            scene.height,
            f,
            cam.vanish_x * scene.width,
            cam.horizon * scene.height,
            cam.height_m,
            scene.conditions.curvature,
        )

    def px(self, x: float, z: float) -> float:
        return self.cx + self.f * (x + self.curvature * z * z) / z

    def py(self, elevation: float, z: float) -> float:
        return self.horizon_y + self.f * (self.cam_h - elevation) / z

    def scale(self, z: float) -> float:
        """Pixels per metre at depth ``z``."""
        return self.f / z

    def near_z(self) -> float:
        """Depth of the ground at the bottom image row."""
        return self.f * self.cam_h / max(1.0, self.height - self.horizon_y)

    def ground_z(self, y: float) -> float:
        """Depth of the ground seen at image row ``y`` (below the horizon)."""
        return self.f * self.cam_h / max(1e-3, y - self.horizon_y)

    def box(self, t: Thing) -> tuple[float, float, float, float]:
        """The instance's unclipped pixel box (x0, y0, x1, y1)."""
        cx = self.px(t.x, t.z)
        half = 0.5 * t.width_m * self.f / t.z
        return cx - half, self.py(t.elevation_m + t.height_m, t.z), cx + half, self.py(t.elevation_m, t.z)
