"""The drawing surface shared by every painter: image, projection, light, and 3-D helpers.

Coordinates go to OpenCV with 4 fractional bits (``shift=4``), so a sign 30 m away moves
smoothly frame to frame in a drive instead of jumping whole pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from retrofit_agent.train.world.look import BGR, Look
from retrofit_agent.train.world.scene import Projection, Scene, hash01  # noqa: F401  (re-exported for painters)

SHIFT = 4
ONE = 1 << SHIFT
Z_FAR = 400.0
_STEPS = {n: np.linspace(0.0, 1.0, n) for n in range(2, 25)}


@dataclass
class Canvas:
    img: np.ndarray
    scene: Scene
    proj: Projection
    look: Look
    rng: np.random.Generator  # per-picture noise: particles, sensor
    xl: float  # road edges (camera coordinates, before curvature)
    xr: float
    glows: list[tuple[float, float, float, float, BGR, float | None]] = field(
        default_factory=list
    )  # x, y, rx, ry, colour, ground y

    @property
    def W(self) -> int:
        return self.scene.width

    @property
    def H(self) -> int:
        return self.scene.height

    # ------------------------------------------------------------------ 2-D primitives

    def poly(self, pts: np.ndarray | list, colour: BGR, aa: bool = False) -> None:
        """Fill one polygon given as float (x, y) points."""
        p = np.round(np.asarray(pts, dtype=np.float64) * ONE).astype(np.int32)
        cv2.fillPoly(self.img, [p], colour, cv2.LINE_AA if aa else cv2.LINE_8, SHIFT)

    def polys(self, pts: list[np.ndarray], colour: BGR, aa: bool = False) -> None:
        if pts:
            cv2.fillPoly(
                self.img,
                [np.round(p * ONE).astype(np.int32) for p in pts],
                colour,
                cv2.LINE_AA if aa else cv2.LINE_8,
                SHIFT,
            )

    def line(self, x0: float, y0: float, x1: float, y1: float, colour: BGR, width: float = 1.0) -> None:
        cv2.line(
            self.img,
            (int(x0 * ONE), int(y0 * ONE)),
            (int(x1 * ONE), int(y1 * ONE)),
            colour,
            max(1, int(round(width))),
            cv2.LINE_AA,
            SHIFT,
        )

    def polylines(self, lines: list[np.ndarray], colour: BGR, width: int = 1) -> None:
        cv2.polylines(
            self.img, [np.round(p * ONE).astype(np.int32) for p in lines], False, colour, width, cv2.LINE_AA, SHIFT
        )

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour: BGR) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], colour, aa=True)

    def circle(self, x: float, y: float, r: float, colour: BGR, thickness: int = -1) -> None:
        cv2.circle(self.img, (int(x * ONE), int(y * ONE)), max(1, int(r * ONE)), colour, thickness, cv2.LINE_AA, SHIFT)

    def glow(
        self, x: float, y: float, r: float, colour: BGR, ry: float | None = None, ground_y: float | None = None
    ) -> None:
        """A light source's halo (or, flattened with ``ry``, its pool on the road), added in
        one blurred pass at the end (see :func:`.effects.add_glows`). ``ground_y`` is the
        image row of the road below the light: a wet road mirrors the light there."""
        self.glows.append((x, y, r, r if ry is None else ry, colour, ground_y))

    # ------------------------------------------------------------------ 3-D helpers

    def zs(self, z0: float, z1: float) -> np.ndarray:
        """Depths to sample a ground-hugging edge between z0 and z1 (more when the road bends)."""
        z0, z1 = max(0.3, z0), max(0.31, z1)
        if self.proj.curvature == 0:
            return np.array((z0, z1))
        n = max(2, min(24, int((z1 - z0) / 6) + 2))
        return z0 * (z1 / z0) ** _STEPS[n]  # geometric spacing, as np.geomspace but cheaper

    def ground_pts(self, x: float, zs: np.ndarray, elev: float = 0.0) -> np.ndarray:
        p = self.proj
        out = np.empty((len(zs), 2))
        out[:, 0] = p.cx + p.f * (x + p.curvature * zs * zs) / zs
        out[:, 1] = p.horizon_y + p.f * (p.cam_h - elev) / zs
        return out

    def ground_band(self, xa: float, xb: float, z0: float, z1: float) -> np.ndarray:
        """The ground polygon between lateral positions xa < xb over depths z0..z1."""
        zs = self.zs(z0, z1)
        return np.concatenate([self.ground_pts(xa, zs), self.ground_pts(xb, zs)[::-1]])

    def wall_band(self, x: float, h0: float, h1: float, z0: float, z1: float) -> np.ndarray:
        """A vertical surface along the road at lateral ``x`` between heights h0 and h1."""
        zs = self.zs(z0, z1)
        return np.concatenate([self.ground_pts(x, zs, h0), self.ground_pts(x, zs, h1)[::-1]])

    def quad_across(self, xa: float, xb: float, h0: float, h1: float, z: float) -> np.ndarray:
        """A surface facing the camera at depth ``z`` (a building front, a portal)."""
        p = self.proj
        x0, x1 = p.px(xa, z), p.px(xb, z)
        y0, y1 = p.py(h1, z), p.py(h0, z)
        return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])

    def visible_range(self) -> tuple[float, float]:
        return 0.8 * self.proj.near_z(), Z_FAR

    def indices(self, pitch: float, z0: float, z1: float) -> range:
        """Prop indices k whose world position k * pitch (shifted by the odometer) is in z0..z1."""
        odo = self.scene.conditions.odometer_m
        return range(int(math.floor((odo + z0) / pitch)), int(math.ceil((odo + z1) / pitch)) + 1)

    def prop_z(self, k: int, pitch: float, jitter: float, salt: int) -> float:
        """Camera depth of prop ``k``: fixed in the world, so it approaches as the odometer grows."""
        seed = self.scene.conditions.layout_seed
        return k * pitch + jitter * hash01(seed, salt, k) - self.scene.conditions.odometer_m
