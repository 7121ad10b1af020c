"""Roadside props that say which road this is: buildings, lamps, trees, rails, fences.

Props are not labelled instances; they are fixed in the world by ``layout_seed`` and an
index along the road, so in a drive they approach and pass like the road itself. Every
painter takes a depth window (z0, z1) so a tunnel portal can cut the world behind it.
"""

from __future__ import annotations

import numpy as np

from retrofit_agent.train.world.canvas import Canvas, hash01
from retrofit_agent.train.world.look import BGR

_FACADES = (
    (150, 170, 195),
    (90, 110, 160),
    (175, 175, 170),
    (120, 130, 135),
    (80, 95, 140),
    (180, 160, 130),
    (200, 205, 210),
    (140, 120, 110),
    (110, 150, 170),
)
_GREENS = ((40, 110, 50), (50, 130, 70), (35, 90, 60), (60, 140, 90), (45, 120, 100))
_CONCRETE: BGR = (165, 165, 160)
_STEEL: BGR = (175, 175, 170)


def sidewalk_width(cv: Canvas) -> float:
    return 2.5 + (cv.scene.conditions.palette[2] % 4) * 0.5


def _h(cv: Canvas, *keys: int) -> float:
    return hash01(cv.scene.conditions.layout_seed, *keys)


def roadside(cv: Canvas, z0: float, z1: float) -> None:
    """Everything beside the road for this road type, far to near within (z0, z1)."""
    road = cv.scene.conditions.road_type
    if road == "urban":
        buildings(cv, z0, z1)
        lamps(cv, z0, z1, pitch=28.0, both=True)
    elif road == "highway":
        trees(cv, z0, z1, inner=7.0, spread=25.0, density=0.5)
        rails(cv, z0, z1)
        if cv.scene.conditions.palette[3] % 2:
            lamps(cv, z0, z1, pitch=40.0, both=False)
    elif road == "rural":
        trees(cv, z0, z1, inner=2.5, spread=10.0, density=0.7)
        fence(cv, z0, z1)
    else:
        lot(cv, z0, z1)


# ---------------------------------------------------------------------------------- town


def buildings(cv: Canvas, z0: float, z1: float) -> None:
    c, look = cv.scene.conditions, cv.look
    sw, pitch = sidewalk_width(cv), 22.0
    night = c.time_of_day != "day"
    blocks = []
    for side in (-1, 1):
        base_x = cv.xr + sw if side > 0 else cv.xl - sw
        for k in cv.indices(pitch, z0 - pitch, min(z1, 170.0)):
            gap = 3 + 9 * _h(cv, side, k, 1) if _h(cv, side, k, 7) < 0.3 else 0.4  # side streets
            za, zb = k * pitch - c.odometer_m + gap, (k + 1) * pitch - c.odometer_m
            if zb <= 0.5 or za >= z1:
                continue
            za, zb = max(za, 0.5), min(zb, z1)
            colour = _FACADES[int(_h(cv, side, k, 2) * len(_FACADES))]
            blocks.append(
                (za, zb, side, base_x + side * 0.6 * _h(cv, side, k, 3), 6 + 20 * _h(cv, side, k, 4), colour, k)
            )
    for za, zb, side, x, height, colour, k in sorted(blocks, key=lambda b: -b[0]):
        mid = (za + zb) / 2
        cv.poly(cv.wall_band(x, 0, height, za, zb), look.shade(colour, mid))
        front = cv.quad_across(min(x, x + side * 14), max(x, x + side * 14), 0, height, za)
        cv.poly(front, look.shade(tuple(v * 0.8 for v in colour), za))  # type: ignore[arg-type]
        _windows(cv, x, za, zb, height, night, k * 2 + (side > 0))


def _windows(cv: Canvas, x: float, za: float, zb: float, height: float, night: bool, key: int) -> None:
    p, look = cv.proj, cv.look
    if p.f * 1.0 / max(za, 0.5) < 0.8:
        return  # windows below a pixel: the facade colour says enough
    dark, lit = [], []
    zs = np.arange(za + 1.0, zb - 1.0, 2.6)
    rows = np.arange(1.4, height - 1.0, 3.0)
    for j, zw in enumerate(zs):
        for i, h in enumerate(rows):
            q = np.array(
                [
                    (p.px(x, zw), p.py(h + 1.6, zw)),
                    (p.px(x, zw + 1.3), p.py(h + 1.6, zw + 1.3)),
                    (p.px(x, zw + 1.3), p.py(h, zw + 1.3)),
                    (p.px(x, zw), p.py(h, zw)),
                ]
            )
            (lit if night and hash01(key, i, j) < 0.45 else dark).append(q)
    zm = (za + zb) / 2
    cv.polys(dark, look.shade((85, 70, 60), zm))
    cv.polys(lit, look.emit((110, 210, 245), zm))


def lamps(cv: Canvas, z0: float, z1: float, pitch: float, both: bool) -> None:
    c = cv.scene.conditions
    lit = c.time_of_day != "day"
    inset = sidewalk_width(cv) * 0.3 if c.road_type == "urban" else 1.0
    for k in reversed(cv.indices(pitch, z0, min(z1, 150.0))):
        for side in (-1, 1) if both else (1,):
            z = cv.prop_z(k, pitch, 4.0, 30 + side)
            if not z0 < z < z1 or z < 1.0:
                continue
            x = cv.xr + inset if side > 0 else cv.xl - inset
            lamp(cv, x, z, -side, lit)


def lamp(cv: Canvas, x: float, z: float, towards: int, lit: bool) -> None:
    """A street lamp on a pole at (x, z), its arm reaching ``towards`` (-1 left, +1 right)."""
    p, look = cv.proj, cv.look
    s = p.scale(z)
    top = 7.5
    pole = look.shade((110, 110, 110), z)
    bx, by, ty = p.px(x, z), p.py(0, z), p.py(top, z)
    cv.rect(bx - 0.09 * s, ty, bx + 0.09 * s, by, pole)
    hx = p.px(x + towards * 1.8, z)
    cv.line(bx, ty, hx, ty, pole, max(1.0, 0.12 * s))
    head = look.emit((215, 240, 255), z) if lit else look.shade((140, 140, 140), z)
    cv.rect(hx - 0.35 * s, ty - 0.05 * s, hx + 0.35 * s, ty + 0.18 * s, head)
    if lit:
        ground = p.py(0, z)
        cv.glow(hx, ty + 0.1 * s, max(2.0, 1.6 * s), (120, 170, 220), ground_y=ground)
        cv.glow(hx, ground, max(2.0, 3.0 * s), (35, 50, 65), ry=max(1.0, 0.9 * s))  # its pool of light


# ---------------------------------------------------------------------------------- country


def trees(cv: Canvas, z0: float, z1: float, inner: float, spread: float, density: float) -> None:
    c, look, p = cv.scene.conditions, cv.look, cv.proj
    pitch = 8.0
    items = []
    for side in (-1, 1):
        edge = cv.xr if side > 0 else cv.xl
        for k in cv.indices(pitch, z0, min(z1, 200.0)):
            if _h(cv, side, k, 40) > density:
                continue
            z = cv.prop_z(k, pitch, pitch, 41 + side)
            if not z0 < z < z1 or z < 1.5:
                continue
            items.append((z, edge + side * (inner + spread * _h(cv, side, k, 42)), side, k))
    snow = c.weather == "snow"
    for z, x, side, k in sorted(items, key=lambda t: -t[0]):
        s = p.scale(z)
        trunk_h, crown = 1.6 + 1.5 * _h(cv, side, k, 43), 1.3 + 1.8 * _h(cv, side, k, 44)
        bx, by = p.px(x, z), p.py(0, z)
        cv.rect(bx - 0.16 * s, p.py(trunk_h + crown * 0.5, z), bx + 0.16 * s, by, look.shade((40, 60, 80), z))
        green = _GREENS[int(_h(cv, side, k, 45) * len(_GREENS))]
        if snow:
            green = tuple(int(0.4 * g + 0.6 * 225) for g in green)  # type: ignore[assignment]
        cy = p.py(trunk_h + crown, z)
        cv.circle(bx, cy, crown * s, look.shade(green, z))
        cv.circle(
            bx - 0.3 * crown * s,
            cy - 0.3 * crown * s,
            0.6 * crown * s,
            look.shade(tuple(min(255, v * 1.15) for v in green), z),
        )  # type: ignore[arg-type]


def fence(cv: Canvas, z0: float, z1: float) -> None:
    look, p = cv.look, cv.proj
    x = cv.xr + 1.9
    posts = []
    for k in cv.indices(3.0, z0, min(z1, 60.0)):
        z = cv.prop_z(k, 3.0, 0.0, 50)
        if z0 < z < z1 and z > 1.0:
            s = p.scale(z)
            bx = p.px(x, z)
            posts.append(
                np.array(
                    [
                        (bx - 0.06 * s, p.py(1.1, z)),
                        (bx + 0.06 * s, p.py(1.1, z)),
                        (bx + 0.06 * s, p.py(0, z)),
                        (bx - 0.06 * s, p.py(0, z)),
                    ]
                )
            )
    cv.polys(posts, look.shade((60, 80, 100), 15.0))
    cv.polylines([cv.ground_pts(x, cv.zs(max(z0, 1.0), min(z1, 60.0)), 1.0)], look.shade((90, 90, 90), 15.0))


def rails(cv: Canvas, z0: float, z1: float) -> None:
    """Highway furniture: a guard rail past the right shoulder, a concrete median on the left."""
    look = cv.look
    za, zb = max(z0, 1.0), min(z1, 300.0)
    right = cv.xr + 2.8
    cv.poly(cv.wall_band(cv.xl - 1.2, 0, 0.9, za, zb), look.shade(_CONCRETE, 25.0))
    cv.poly(cv.wall_band(cv.xl - 1.2, 0.75, 0.9, za, zb), look.shade((195, 195, 190), 25.0))
    posts = []
    for k in cv.indices(4.0, za, min(zb, 80.0)):
        z = cv.prop_z(k, 4.0, 0.0, 60)
        if za < z < zb:
            s, bx = cv.proj.scale(z), cv.proj.px(right, z)
            posts.append(
                np.array(
                    [
                        (bx - 0.07 * s, cv.proj.py(0.75, z)),
                        (bx + 0.07 * s, cv.proj.py(0.75, z)),
                        (bx + 0.07 * s, cv.proj.py(0, z)),
                        (bx - 0.07 * s, cv.proj.py(0, z)),
                    ]
                )
            )
    cv.polys(posts, look.shade((90, 90, 90), 20.0))
    cv.poly(cv.wall_band(right, 0.45, 0.8, za, zb), look.shade(_STEEL, 25.0))


def lot(cv: Canvas, z0: float, z1: float) -> None:
    """A parking lot's edges: a building across the far end, trees and lamp posts."""
    c, look = cv.scene.conditions, cv.look
    far = 45.0 + 45.0 * _h(cv, 70)
    if z0 < far < z1:
        height = 7 + 10 * _h(cv, 71)
        colour = _FACADES[int(_h(cv, 72) * len(_FACADES))]
        cv.poly(cv.quad_across(-80, 80, 0, height, far), look.shade(colour, far))
        cv.poly(cv.quad_across(-80, 80, height - 0.6, height, far), look.shade(tuple(v * 0.7 for v in colour), far))  # type: ignore[arg-type]
        _windows_across(cv, far, height, c.time_of_day != "day")
    trees(cv, z0, min(z1, far), inner=14.0, spread=8.0, density=0.6)
    for side in (-1, 1):
        x = (cv.xr + 5.6) if side > 0 else (cv.xl - 5.6)
        for k in reversed(cv.indices(25.0, z0, min(z1, far))):
            z = cv.prop_z(k, 25.0, 3.0, 73 + side)
            if z0 < z < min(z1, far) and z > 1.0:
                lamp(cv, x, z, -side, c.time_of_day != "day")


def _windows_across(cv: Canvas, z: float, height: float, night: bool) -> None:
    look = cv.look
    polys_dark, polys_lit = [], []
    for i, h in enumerate(np.arange(1.5, height - 1.0, 3.0)):
        for j, x in enumerate(np.arange(-40.0, 40.0, 3.0)):
            q = cv.quad_across(x, x + 1.6, h, h + 1.5, z)
            (polys_lit if night and hash01(i, j, int(z)) < 0.4 else polys_dark).append(q)
    cv.polys(polys_dark, look.shade((80, 65, 55), z))
    cv.polys(polys_lit, look.emit((110, 210, 245), z))
