"""The scene label's structures: tunnels (inside, and the portal ahead) and bridges.

Inside a tunnel nothing of the sky or the weather shows, which is why
:mod:`.annotate` reports weather and time of day as ``null`` there; the far exit glows in
the colour of the light outside, as real tunnel exits do, but is never used as the label.
"""

from __future__ import annotations

import math

import numpy as np

from retrofit_agent.train.world.canvas import Z_FAR, Canvas, hash01
from retrofit_agent.train.world.ground import WHITE, asphalt
from retrofit_agent.train.world.look import BGR
from retrofit_agent.train.world.props import lamp
from retrofit_agent.train.world.scene import tunnel_section

_EXIT = {"day": (235, 242, 248), "dusk": (120, 175, 235), "night": (40, 32, 28)}
_TILES = ((205, 205, 198), (185, 195, 200), (200, 215, 215), (170, 170, 165))
_TOWERS = ((60, 60, 170), (170, 170, 165), (120, 120, 115), (90, 110, 60))


def _h(cv: Canvas, *keys: int) -> float:
    return hash01(cv.scene.conditions.layout_seed, *keys)


# ---------------------------------------------------------------------------------- tunnel


class Tunnel:
    """Cross-section and palette of one tunnel (stable over a drive)."""

    def __init__(self, cv: Canvas) -> None:
        c = cv.scene.conditions
        self.wl, self.wr, self.hc = tunnel_section(c)
        self.tiles = _TILES[int(_h(cv, 81) * len(_TILES))]
        self.start = c.tunnel_start_m
        self.end = c.tunnel_start_m + c.tunnel_length_m
        self.lamp_pitch = 4.0 + 4.0 * _h(cv, 82)
        self.centre_lamps = _h(cv, 83) < 0.4

    def opening(self, cv: Canvas, z: float) -> np.ndarray:
        """The arch-topped cross-section at depth ``z``, as image points."""
        p = cv.proj
        pts = [(p.px(self.wl, z), p.py(0, z)), (p.px(self.wl, z), p.py(self.hc - 1.0, z))]
        mid, half = (self.wl + self.wr) / 2, (self.wr - self.wl) / 2
        for a in np.linspace(math.pi * 0.85, math.pi * 0.15, 7):  # a flat arch
            pts.append((p.px(mid + half * math.cos(a), z), p.py(self.hc - 1.0 + 1.6 * math.sin(a), z)))
        pts += [(p.px(self.wr, z), p.py(self.hc - 1.0, z)), (p.px(self.wr, z), p.py(0, z))]
        return np.array(pts)

    def draw_inside(self, cv: Canvas, z_from: float, dim: float = 1.0) -> None:
        """Walls, ceiling, floor, markings and lamps from ``z_from`` to the exit, far to near."""
        c, look = cv.scene.conditions, cv.look
        z_lo, z_hi = max(z_from, 0.8 * cv.proj.near_z()), min(self.end, Z_FAR)
        if z_hi < Z_FAR:
            cv.poly(self.opening(cv, z_hi), look.emit(_EXIT[c.time_of_day], 0.0))
            if c.time_of_day != "night":
                cx, cy = cv.proj.px((self.wl + self.wr) / 2, z_hi), cv.proj.py(self.hc / 2, z_hi)
                cv.glow(cx, cy, cv.proj.scale(z_hi) * self.hc, _EXIT[c.time_of_day])
        road = asphalt(cv)
        zs = np.geomspace(z_lo, z_hi, 26)
        upper = tuple(v * 0.6 for v in self.tiles)
        for za, zb in zip(zs[-2::-1], zs[:0:-1]):
            zm = (za + zb) / 2

            def sh(col: BGR | tuple, zm: float = zm) -> BGR:
                return tuple(int(v * dim) for v in look.shade(col, zm))  # type: ignore[return-value]

            cv.poly(cv.ground_band(self.wl, self.wr, za, zb), sh((150, 150, 148)))
            cv.poly(cv.ground_band(cv.xl, cv.xr, za, zb), sh(road))
            for x in (self.wl, self.wr):
                cv.poly(cv.wall_band(x, 0, 2.4, za, zb), sh(self.tiles))
                cv.poly(cv.wall_band(x, 2.4, self.hc - 1.0, za, zb), sh(upper))
            ceiling = np.concatenate(
                [
                    cv.ground_pts(self.wl, np.array([za, zb]), self.hc - 1.0),
                    cv.ground_pts((self.wl + self.wr) / 2, np.array([zb, za]), self.hc + 0.6),
                ]
            )
            cv.poly(ceiling, sh((85, 85, 88)))
            ceiling = np.concatenate(
                [
                    cv.ground_pts(self.wr, np.array([za, zb]), self.hc - 1.0),
                    cv.ground_pts((self.wl + self.wr) / 2, np.array([zb, za]), self.hc + 0.6),
                ]
            )
            cv.poly(ceiling, sh((75, 75, 78)))
            for k in range(1, c.lanes):
                x = cv.xl + k * c.lane_width_m
                if (za + c.odometer_m) % 12.0 < 4.0:
                    cv.poly(cv.ground_band(x - 0.08, x + 0.08, za, zb), sh(WHITE), aa=True)
            for x in (cv.xl + 0.2, cv.xr - 0.2):
                cv.poly(cv.ground_band(x - 0.08, x + 0.08, za, zb), sh(WHITE), aa=True)
        self._lamps(cv, z_lo, z_hi, dim)

    def _lamps(self, cv: Canvas, z_lo: float, z_hi: float, dim: float) -> None:
        p, look, odo = cv.proj, cv.look, cv.scene.conditions.odometer_m
        xs = ((self.wl + self.wr) / 2,) if self.centre_lamps else (self.wl + 1.0, self.wr - 1.0)
        colour = (200, 235, 255) if cv.scene.conditions.palette[3] % 2 == 0 else (90, 190, 255)
        for k in reversed(
            range(int((odo + z_lo) / self.lamp_pitch), int((odo + min(z_hi, 200.0)) / self.lamp_pitch) + 1)
        ):
            z = k * self.lamp_pitch - odo
            if not z_lo < z < z_hi:
                continue
            for x in xs:
                h = self.hc + 0.5 if self.centre_lamps else self.hc - 0.8
                q = np.array(
                    [
                        (p.px(x - 0.25, z), p.py(h, z)),
                        (p.px(x + 0.25, z), p.py(h, z)),
                        (p.px(x + 0.25, z + 1.4), p.py(h, z + 1.4)),
                        (p.px(x - 0.25, z + 1.4), p.py(h, z + 1.4)),
                    ]
                )
                cv.poly(q, tuple(int(v * max(dim, 0.8)) for v in look.emit(colour, z)), aa=True)  # type: ignore[arg-type]
                if z < 60:
                    cv.glow(p.px(x, z), p.py(h, z), max(1.5, 0.9 * p.scale(z)), (60, 90, 110))

    def draw_portal(self, cv: Canvas) -> None:
        """A hill with a concrete portal around the arch, when the tunnel is still ahead.

        The hill stops well below the top of the picture: from outside the sky (and so the
        weather and time of day) must stay visible, as the annotation says it is."""
        p, look, z = cv.proj, cv.look, self.start
        snow = cv.scene.conditions.weather == "snow"
        room = p.cam_h + (p.horizon_y - 0.15 * cv.H) / p.scale(z)  # elevation of the row at 15% height
        top = min(self.hc + 4.0 + 12.0 * _h(cv, 84), room)
        hill: BGR = (215, 215, 212) if snow else ((60, 110, 75), (70, 100, 110), (55, 95, 90))[int(_h(cv, 85) * 3)]
        xs = np.linspace(-150, 150, 31)
        shape = np.clip(1.15 - (xs / 150) ** 2, 0, 1) * (0.8 + 0.2 * np.sin(xs / 11 + _h(cv, 86) * 6))
        outer = np.array(
            [(p.px(x, z), p.py(max(0.5, top * s), z)) for x, s in zip(xs, shape)]
            + [(p.px(150, z), p.py(0, z)), (p.px(-150, z), p.py(0, z))]
        )
        cv.polys([outer, self.opening(cv, z)], look.shade(hill, z + 5))  # two contours: the arch is a hole
        frame_top = self.hc + 1.2 + 1.5 * _h(cv, 87)
        face = np.array(
            [
                (p.px(self.wl - 2.5, z), p.py(0, z)),
                (p.px(self.wl - 2.5, z), p.py(frame_top, z)),
                (p.px(self.wr + 2.5, z), p.py(frame_top, z)),
                (p.px(self.wr + 2.5, z), p.py(0, z)),
            ]
        )
        cv.polys([face, self.opening(cv, z)], look.shade((165, 165, 160), z))
        cv.polylines([self.opening(cv, z)], look.shade((50, 50, 50), z), max(1, int(0.25 * p.scale(z))))


def tunnel(cv: Canvas) -> Tunnel:
    return Tunnel(cv)


# ---------------------------------------------------------------------------------- bridge


def bridge(cv: Canvas, z0: float, z1: float) -> None:
    """Railings on both deck edges, plus towers and cables, a steel truss, or lamps."""
    c = cv.scene.conditions
    el, er = cv.xl - 2.0, cv.xr + 2.0
    kind = c.palette[6] % 3
    za, zb = max(z0, 1.0), min(z1, 300.0)
    if kind == 0:
        _suspension(cv, el - 1.0, er + 1.0, za, zb)
    elif kind == 1:
        _truss(cv, el, er, za, zb)
    _railings(cv, el, er, za, zb)
    if kind == 2:
        for k in reversed(cv.indices(30.0, za, min(zb, 150.0))):
            z = cv.prop_z(k, 30.0, 0.0, 90)
            if za < z < zb:
                for x, towards in ((el, 1), (er, -1)):
                    lamp(cv, x, z, towards, c.time_of_day != "day")


def _railings(cv: Canvas, el: float, er: float, za: float, zb: float) -> None:
    look, p = cv.look, cv.proj
    steel = look.shade((190, 190, 185), 20.0)
    posts = []
    for k in cv.indices(2.5, za, min(zb, 70.0)):
        z = cv.prop_z(k, 2.5, 0.0, 91)
        if za < z < zb:
            s = p.scale(z)
            for x in (el, er):
                bx = p.px(x, z)
                posts.append(
                    np.array(
                        [
                            (bx - 0.05 * s, p.py(1.15, z)),
                            (bx + 0.05 * s, p.py(1.15, z)),
                            (bx + 0.05 * s, p.py(0, z)),
                            (bx - 0.05 * s, p.py(0, z)),
                        ]
                    )
                )
    cv.polys(posts, steel)
    for x in (el, er):
        cv.poly(cv.wall_band(x, 0, 0.3, za, zb), look.shade((150, 150, 145), 20.0))
        cv.poly(cv.wall_band(x, 1.0, 1.15, za, zb), steel)
        cv.poly(cv.wall_band(x, 0.55, 0.62, za, zb), steel)


def _suspension(cv: Canvas, xl: float, xr: float, za: float, zb: float) -> None:
    c, look, p = cv.scene.conditions, cv.look, cv.proj
    colour = _TOWERS[int(_h(cv, 92) * len(_TOWERS))]
    span, height = 180.0, 50.0
    for k in reversed(cv.indices(span, za, zb)):
        z = k * span + 60.0 - c.odometer_m
        if not za < z < zb:
            continue
        col, s = look.shade(colour, z), p.scale(z)
        for x in (xl, xr):
            cv.rect(p.px(x, z) - 0.9 * s, p.py(height, z), p.px(x, z) + 0.9 * s, p.py(0, z), col)
        for h in (22.0, 38.0, 48.0):
            cv.rect(p.px(xl, z), p.py(h + 1.2, z), p.px(xr, z), p.py(h, z), col)
    zs = np.geomspace(za, zb, 40)
    zw = zs + c.odometer_m
    mid = np.floor((zw - 60.0) / span) * span + 60.0 + span / 2
    hs = 2.0 + (height - 2.0) * ((zw - mid) / (span / 2)) ** 2
    cable = look.shade(colour, 40.0)
    for x in (xl, xr):
        pts = np.stack([p.cx + p.f * (x + p.curvature * zs * zs) / zs, p.horizon_y + p.f * (p.cam_h - hs) / zs], 1)
        cv.polylines([pts], cable, max(1, int(0.05 * p.scale(za))))
    hangers = []
    for k in cv.indices(8.0, za, min(zb, 90.0)):
        z = k * 8.0 - c.odometer_m
        if za < z < zb:
            zw1 = z + c.odometer_m
            m = math.floor((zw1 - 60.0) / span) * span + 60.0 + span / 2
            h = 2.0 + (height - 2.0) * ((zw1 - m) / (span / 2)) ** 2
            for x in (xl, xr):
                hangers.append(np.array([(p.px(x, z), p.py(1.1, z)), (p.px(x, z), p.py(h, z))]))
    cv.polylines(hangers, cable)


def _truss(cv: Canvas, el: float, er: float, za: float, zb: float) -> None:
    c, look, p = cv.scene.conditions, cv.look, cv.proj
    colour = _TOWERS[int(_h(cv, 93) * len(_TOWERS))]
    top = 7.0
    col = look.shade(colour, 25.0)
    width = max(1, int(0.25 * p.scale(max(za, 4.0))))
    lines = []
    for k in cv.indices(8.0, za - 8.0, min(zb, 120.0)):
        z = k * 8.0 - c.odometer_m
        if z + 8.0 < za or z > zb:
            continue
        a, b = max(z, za), max(z + 4.0, za)
        for x in (el, er):
            lines.append(np.array([(p.px(x, a), p.py(0.3, a)), (p.px(x, b), p.py(top, b))]))
            lines.append(
                np.array([(p.px(x, b), p.py(top, b)), (p.px(x, max(z + 8.0, za)), p.py(0.3, max(z + 8.0, za)))])
            )
        if z > za:
            lines.append(np.array([(p.px(el, z), p.py(top, z)), (p.px(er, z), p.py(top, z))]))
    cv.polylines(lines, col, width)
    for x in (el, er):
        cv.poly(cv.wall_band(x, top - 0.4, top, za, zb), col)
