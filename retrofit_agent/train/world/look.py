"""Light, haze and colour for one scene: what time of day and weather do to every surface.

Surfaces are drawn with their daylight colour passed through :meth:`Look.shade`, which
multiplies by the ambient light (plus the ego car's headlights at night, falling off with
depth) and blends towards the fog colour by depth. Emissive things (lamps, lit traffic
lights, windows at night) use :meth:`Look.emit`, which ignores the ambient light, so at
night they are what stands out, as on a real road.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from retrofit_agent.train.world.scene import Scene

BGR = tuple[int, int, int]

# Ambient light (B, G, R multipliers) by time of day, then scaled by weather.
_AMBIENT = {"day": (1.0, 1.0, 1.0), "dusk": (0.5, 0.58, 0.78), "night": (0.15, 0.15, 0.18)}
_WEATHER_LIGHT = {"clear": 1.0, "cloudy": 0.82, "rain": 0.68, "snow": 0.92, "fog": 0.85}
# Sky gradient (top, horizon) by (time, weather); weather keys not listed fall back to "cloudy".
_SKY: dict[tuple[str, str], tuple[BGR, BGR]] = {
    ("day", "clear"): ((205, 135, 60), (245, 215, 175)),
    ("day", "cloudy"): ((165, 160, 155), (205, 200, 195)),
    ("day", "rain"): ((115, 110, 105), (155, 150, 145)),
    ("day", "snow"): ((200, 198, 195), (228, 228, 225)),
    ("dusk", "clear"): ((120, 55, 60), (90, 150, 245)),
    ("dusk", "cloudy"): ((95, 85, 95), (105, 125, 170)),
    ("dusk", "rain"): ((75, 65, 70), (90, 100, 125)),
    ("dusk", "snow"): ((120, 105, 110), (140, 150, 180)),
    ("night", "clear"): ((30, 12, 6), (70, 45, 35)),
    ("night", "cloudy"): ((38, 34, 34), (60, 58, 60)),
    ("night", "rain"): ((30, 28, 28), (48, 46, 46)),
    ("night", "snow"): ((45, 42, 42), (75, 72, 72)),
}
_FOG_COLOUR = {"day": (200, 200, 196), "dusk": (125, 140, 165), "night": (62, 58, 55)}
_BEAM_M = 16.0  # headlight fall-off with depth
_TUNNEL_LAMPS = ((0.72, 0.8, 0.86), (0.45, 0.7, 0.95))  # white LED, sodium orange


@dataclass
class Look:
    ambient: np.ndarray  # (3,) float
    headlight: float  # extra light near the camera (night, dusk, tunnels)
    fog_colour: np.ndarray  # (3,) float
    fog_m: float
    sky_top: np.ndarray
    sky_bottom: np.ndarray
    time: str
    weather: str
    wet: bool

    @classmethod
    def of(cls, scene: Scene, inside_tunnel: bool = False) -> Look:
        c = scene.conditions
        rng = np.random.default_rng(c.layout_seed)
        jitter = rng.normal(0, 8, 6)
        top, bottom = _SKY.get((c.time_of_day, c.weather), _SKY[(c.time_of_day, "cloudy")])
        ambient = np.array(_AMBIENT[c.time_of_day]) * _WEATHER_LIGHT[c.weather] * rng.uniform(0.9, 1.1)
        fog = np.array(_FOG_COLOUR[c.time_of_day], dtype=float)
        if c.weather != "fog":
            fog = np.array(bottom, dtype=float)  # haze takes the colour of the horizon
        head = {"day": 0.0, "dusk": 0.25, "night": 0.6}[c.time_of_day]
        if inside_tunnel:
            ambient = np.array(_TUNNEL_LAMPS[c.palette[3] % 2]) * rng.uniform(0.8, 1.05)
            fog, head = np.array((90.0, 95.0, 100.0)), 0.2
        return cls(
            ambient=ambient,
            headlight=head,
            fog_colour=fog,
            fog_m=max(c.fog_m, 300.0) if inside_tunnel else c.fog_m,
            sky_top=np.clip(np.array(top) + jitter[:3], 0, 255),
            sky_bottom=np.clip(np.array(bottom) + jitter[3:], 0, 255),
            time=c.time_of_day,
            weather=c.weather,
            wet=c.weather == "rain" and not inside_tunnel,
        )

    def __post_init__(self) -> None:
        # Plain floats: shade() runs a few hundred times per picture, numpy per call is slower.
        self._amb = tuple(float(v) for v in self.ambient)
        self._fog = tuple(float(v) for v in self.fog_colour)
        self._floor = 0.5 if self.time == "night" else 0.0

    def haze(self, z: float) -> float:
        return 1.0 - math.exp(-max(0.0, z) / self.fog_m)

    def shade(self, bgr: BGR | tuple[float, ...], z: float) -> BGR:
        a = self.haze(z)
        head = self.headlight * math.exp(-z / _BEAM_M)
        (b, g, r), (ab, ag, ar), (fb, fg, fr) = bgr, self._amb, self._fog
        return (
            int(min(255.0, b * (ab + head)) * (1 - a) + fb * a),
            int(min(255.0, g * (ag + head)) * (1 - a) + fg * a),
            int(min(255.0, r * (ar + head)) * (1 - a) + fr * a),
        )

    def thing(self, bgr: BGR | tuple[float, ...], z: float) -> BGR:
        """:meth:`shade` for labelled instances: at night street lights and headlights keep
        them at least half lit, so the dark is the background's cue, not a hiding place."""
        if self._floor <= 0:
            return self.shade(bgr, z)
        a = self.haze(z)
        (b, g, r), (fb, fg, fr) = bgr, self._fog
        head = self.headlight * math.exp(-z / _BEAM_M)
        lb, lg, lr = (max(self._floor, v + head) for v in self._amb)
        return (
            int(min(255.0, b * lb) * (1 - a) + fb * a),
            int(min(255.0, g * lg) * (1 - a) + fg * a),
            int(min(255.0, r * lr) * (1 - a) + fr * a),
        )

    def emit(self, bgr: BGR, z: float) -> BGR:
        """Light sources: no ambient, and fog only dims them half as much (they glow through)."""
        a = 0.5 * self.haze(z)
        (b, g, r), (fb, fg, fr) = bgr, self._fog
        return int(b * (1 - a) + fb * a), int(g * (1 - a) + fg * a), int(r * (1 - a) + fr * a)

    def row_light(self, zs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row (multiplier, additive) pair for ground rows at depths ``zs``: the same
        ambient + headlight + fog as :meth:`shade`, vectorised for the ground pass."""
        a = 1.0 - np.exp(-np.maximum(zs, 0) / self.fog_m)
        lit = self.ambient[None, :] + self.headlight * np.exp(-zs / _BEAM_M)[:, None]
        return (lit * (1 - a)[:, None]).astype(np.float32), (self.fog_colour[None, :] * a[:, None]).astype(np.float32)
