"""Sky, far horizon, ground, road surface and markings: the flat layers of a picture.

The ground is painted in daylight colours and then lit row by row (:func:`light_ground`):
every ground row has one depth, so ambient light, headlights and fog are one vectorised
pass instead of a per-pixel depth map.
"""

from __future__ import annotations

import math

import numpy as np

from retrofit_agent.train.world.canvas import Z_FAR, Canvas, hash01
from retrofit_agent.train.world.look import BGR

WHITE: BGR = (232, 232, 230)
YELLOW: BGR = (40, 190, 225)
_GRASS = ((60, 125, 80), (50, 140, 95), (70, 120, 100), (55, 110, 70))
_FIELDS = ((60, 140, 90), (70, 175, 200), (60, 95, 130), (45, 120, 75), (90, 160, 170))
_ASPHALT = ((92, 92, 95), (80, 82, 84), (105, 104, 104), (70, 72, 75))
_SNOW: BGR = (232, 232, 228)


def _vary(c: BGR, k: int, amount: float = 10.0) -> BGR:
    d = (hash01(k, 1) - 0.5) * 2 * amount
    return tuple(int(min(255, max(0, v + d + (hash01(k, i + 2) - 0.5) * amount))) for i, v in enumerate(c))  # type: ignore[return-value]


def asphalt(cv: Canvas) -> BGR:
    c = cv.scene.conditions
    base = _vary(_ASPHALT[c.palette[0] % len(_ASPHALT)], c.layout_seed)
    if c.weather == "rain":
        return tuple(int(v * 0.62) for v in base)  # type: ignore[return-value]  # wet asphalt is darker
    if c.weather == "snow":
        return tuple(int(v * 1.35 + 20) for v in base)  # type: ignore[return-value]  # packed snow, grey slush
    return base


# ---------------------------------------------------------------------------------- sky


def sky(cv: Canvas) -> None:
    p, look, c = cv.proj, cv.look, cv.scene.conditions
    y0 = min(cv.H, max(0, int(math.ceil(p.horizon_y))))
    if y0 == 0:
        return
    t = np.linspace(0.0, 1.0, y0, dtype=np.float32)[:, None] ** 0.8
    top, bottom = look.sky_top, look.sky_bottom
    if c.weather == "fog":  # the sky is the fog itself
        top, bottom = look.fog_colour * 0.92, look.fog_colour
    if c.time_of_day == "night" and c.road_type == "urban":
        bottom = bottom * 0.6 + np.array((40.0, 70.0, 110.0)) * 0.4  # sodium glow over a town
    rows = top[None, :] * (1 - t) + bottom[None, :] * t
    cv.img[:y0] = rows.astype(np.uint8)[:, None, :]
    rng = np.random.default_rng(c.layout_seed + 11)  # stable per drive: clouds do not jump
    if c.weather == "clear":
        _sun_or_stars(cv, rng, y0)
    elif c.weather in ("cloudy", "rain", "snow"):
        _clouds(cv, rng, y0)


def _sun_or_stars(cv: Canvas, rng: np.random.Generator, y0: int) -> None:
    c, H, W = cv.scene.conditions, cv.H, cv.W
    if c.time_of_day == "night":
        for _ in range(int(W * y0 / 250)):
            x, y = rng.uniform(0, W), rng.uniform(0, y0 * 0.85)
            v = int(rng.uniform(150, 255))
            cv.circle(x, y, 0.4 + 0.5 * rng.random(), (v, v, v))
        if rng.random() < 0.4:
            cv.circle(rng.uniform(0.1, 0.9) * W, rng.uniform(0.2, 0.6) * y0, 0.035 * H, (215, 235, 240))
        return
    dusk = c.time_of_day == "dusk"
    x = rng.uniform(0.1, 0.9) * W
    y = (rng.uniform(0.75, 0.95) if dusk else rng.uniform(0.15, 0.6)) * y0
    r = (0.06 if dusk else 0.04) * H * rng.uniform(0.8, 1.3)
    colour = (60, 150, 255) if dusk else (225, 250, 255)
    cv.circle(x, y, r, colour)
    cv.glow(x, y, r * 2.2, (30, 80, 170) if dusk else (120, 140, 150))
    for _ in range(int(rng.integers(0, 4))):  # a few fair-weather clouds
        cx, cy = rng.uniform(0, W), rng.uniform(0.1, 0.7) * y0
        _blob(cv, rng, cx, cy, rng.uniform(0.06, 0.15) * W, (250, 250, 250) if not dusk else (150, 170, 230))


def _clouds(cv: Canvas, rng: np.random.Generator, y0: int) -> None:
    W, look = cv.W, cv.look
    base = (look.sky_top + look.sky_bottom) / 2
    for _ in range(int(rng.integers(6, 14))):
        cx, cy = rng.uniform(-0.1, 1.1) * W, rng.uniform(0.0, 0.85) * y0
        shade = rng.uniform(0.75, 1.15)
        col = tuple(int(min(255, v * shade)) for v in base)
        _blob(cv, rng, cx, cy, rng.uniform(0.12, 0.35) * W, col)  # type: ignore[arg-type]


def _blob(cv: Canvas, rng: np.random.Generator, cx: float, cy: float, size: float, col: BGR) -> None:
    for _ in range(4):
        cv.circle(
            cx + rng.uniform(-0.6, 0.6) * size,
            cy + rng.uniform(-0.15, 0.15) * size,
            size * rng.uniform(0.25, 0.45),
            col,
        )


def far_horizon(cv: Canvas) -> None:
    """Hills, a treeline or a town skyline on the horizon, hazed like distant things."""
    c, p, W, H = cv.scene.conditions, cv.proj, cv.W, cv.H
    rng = np.random.default_rng(c.layout_seed + 12)
    xs = np.linspace(-2, W + 2, 33)
    hy = p.horizon_y
    if c.road_type == "urban":
        x = -2.0
        while x < W + 2:
            w = rng.uniform(0.04, 0.12) * W
            h = rng.uniform(0.03, 0.14) * H
            col = cv.look.shade(tuple(rng.uniform(90, 160, 3)), 900.0)  # type: ignore[arg-type]
            cv.rect(x, hy - h, x + w, hy + 1, col)
            if c.time_of_day == "night":
                for _ in range(int(w * h / 30)):
                    wx, wy = rng.uniform(x, x + w), rng.uniform(hy - h, hy)
                    cv.rect(wx, wy, wx + 1, wy + 1, (90, 190, 230))
            x += w * rng.uniform(0.7, 1.1)
        return
    phase = rng.uniform(0, 6.28, 3)
    freq = rng.uniform(1, 5, 3)
    amp = rng.uniform(0.01, 0.07) * H
    prof = amp * (
        1.3 + 0.5 * np.sin(freq[0] * xs / W * 6.28 + phase[0]) + 0.3 * np.sin(freq[1] * xs / W * 12.5 + phase[1])
    )
    if c.road_type == "rural" or rng.random() < 0.5:  # a treeline: rough top
        prof = prof * 0.6 + rng.uniform(0, 0.012 * H, len(xs))
    base = (70, 110, 80) if c.weather != "snow" else (200, 200, 200)
    col = cv.look.shade(base, 700.0)
    pts = np.concatenate([np.stack([xs, hy - prof], 1), [(W + 2, hy + 1), (-2, hy + 1)]])
    cv.poly(pts, col)


# ---------------------------------------------------------------------------------- ground


def ground(cv: Canvas) -> None:
    """The ground below the horizon, unlit: grass, fields, asphalt or water, and the road."""
    c, p = cv.scene.conditions, cv.proj
    y0 = min(cv.H, max(0, int(math.floor(p.horizon_y))))
    snow = c.weather == "snow"
    z0, z1 = cv.visible_range()
    if c.scene == "bridge":
        base: BGR = _vary((120, 95, 60), c.palette[1]) if c.palette[1] % 3 else _vary((95, 105, 80), c.palette[1])
    elif c.road_type == "parking":
        base = _vary(_ASPHALT[c.palette[0] % 4], c.layout_seed + 3)
    elif snow:
        base = _SNOW
    else:
        base = _vary(_GRASS[c.palette[1] % len(_GRASS)], c.palette[2])
    cv.img[y0:] = base
    if c.road_type == "rural" and c.scene != "bridge":
        _fields(cv, z0, z1, snow)
    if c.scene == "bridge":
        _waves(cv, base)
    _road_surface(cv, z0, z1, snow)
    markings(cv, z0, z1)


def _fields(cv: Canvas, z0: float, z1: float, snow: bool) -> None:
    c = cv.scene.conditions
    for side, k in ((-1, 4), (1, 5)):
        col = _SNOW if snow else _vary(_FIELDS[c.palette[k] % len(_FIELDS)], c.palette[k])
        inner = cv.xr + 1.5 if side > 0 else cv.xl - 1.5
        outer = inner + side * 400
        band = cv.ground_band(min(inner, outer), max(inner, outer), z0, z1)
        cv.poly(band, col)
        furrow = tuple(int(v * 0.82) for v in col)
        step = 1.2 + (c.palette[k] % 5) * 0.4  # furrow spacing varies field to field
        zs = cv.zs(z0, 120.0)
        cv.polylines([cv.ground_pts(inner + side * i * step, zs) for i in range(1, 30)], furrow)


def _waves(cv: Canvas, base: BGR) -> None:
    rng = np.random.default_rng(cv.scene.conditions.layout_seed + 13)
    y0 = cv.proj.horizon_y
    light = tuple(int(min(255, v * 1.25 + 10)) for v in base)
    n = int(cv.W * cv.H / 90)
    t = rng.random(n) ** 1.6  # denser towards the horizon, as perspective makes them
    ys = y0 + 1 + t * (cv.H - y0)
    xs = rng.uniform(0, cv.W, n)
    segs = np.stack([np.stack([xs, ys], 1), np.stack([xs + 1 + 10 * t, ys], 1)], 1)
    cv.polylines(list(segs), light)  # type: ignore[arg-type]


def _road_surface(cv: Canvas, z0: float, z1: float, snow: bool) -> None:
    c = cv.scene.conditions
    road = asphalt(cv)
    xl, xr = cv.xl, cv.xr
    if c.road_type == "parking":
        return  # the whole lot is asphalt already
    if c.scene == "bridge":
        cv.poly(cv.ground_band(xl - 2.0, xr + 2.0, z0, z1), (165, 165, 160))  # deck walkways
    if c.road_type == "urban":
        sw = 2.5 + (c.palette[2] % 4) * 0.5
        pave = _vary((168, 168, 162), c.palette[2])
        cv.poly(cv.ground_band(xl - sw, xl, z0, z1), pave)
        cv.poly(cv.ground_band(xr, xr + sw, z0, z1), pave)
    elif c.road_type == "highway":
        cv.poly(cv.ground_band(xl - 1.2, xr + 2.8, z0, z1), tuple(int(v * 1.06) for v in road))  # shoulders
    elif c.road_type == "rural" and not snow:
        cv.poly(cv.ground_band(xl - 0.6, xr + 0.6, z0, z1), (90, 120, 135))  # gravel verge
    cv.poly(cv.ground_band(xl, xr, z0, z1), road)
    if snow:  # snow banks along both edges, tyre tracks darker
        for edge, side in ((xl, -1), (xr, 1)):
            cv.poly(cv.ground_band(min(edge, edge - side * 0.9), max(edge, edge - side * 0.9), z0, z1), _SNOW)
        for k in range(c.lanes):
            centre = xl + (k + 0.5) * c.lane_width_m
            for dx in (-0.8, 0.8):
                cv.poly(
                    cv.ground_band(centre + dx - 0.25, centre + dx + 0.25, z0, z1), tuple(int(v * 0.7) for v in road)
                )


def markings(cv: Canvas, z0: float, z1: float) -> None:
    c = cv.scene.conditions
    xl, xr, lw = cv.xl, cv.xr, c.lane_width_m
    roadworks = c.scene == "construction_zone" and c.palette[6] % 2 == 0
    paint = YELLOW if roadworks else WHITE  # temporary yellow lines in some road works
    if c.weather == "snow":
        paint = (205, 205, 205)
    zmax = min(z1, 160.0)
    if c.road_type == "parking":
        _bays(cv, z0, zmax, paint)
        return
    if c.road_type == "highway":
        for x in (xl + 0.25, xr - 0.25):
            _solid(cv, x, 0.2, z0, zmax, paint)
        for k in range(1, c.lanes):
            _dashes(cv, xl + k * lw, 0.18, 4.0, 12.0, z0, zmax, paint)
        return
    centre = (xl + xr) / 2
    if c.road_type == "urban" and c.lanes == 4:
        for dx in (-0.15, 0.15):
            _solid(cv, centre + dx, 0.12, z0, zmax, YELLOW if c.palette[5] % 2 else paint)
        for x in (xl + lw, xr - lw):
            _dashes(cv, x, 0.15, 3.0, 9.0, z0, zmax, paint)
    elif c.palette[5] % 3 == 0 and c.road_type == "urban":
        for dx in (-0.15, 0.15):
            _solid(cv, centre + dx, 0.12, z0, zmax, YELLOW)
    else:
        _dashes(cv, centre, 0.15, 3.0, 9.0, z0, zmax, paint)
    if c.road_type == "rural" and c.palette[5] % 2:
        for x in (xl + 0.2, xr - 0.2):
            _solid(cv, x, 0.12, z0, zmax, paint)
    if c.road_type == "urban" and c.palette[7] % 2:
        _zebra(cv, paint)


def _solid(cv: Canvas, x: float, w: float, z0: float, z1: float, paint: BGR) -> None:
    cv.poly(cv.ground_band(x - w / 2, x + w / 2, z0, z1), paint, aa=True)


def _dashes(cv: Canvas, x: float, w: float, dash: float, period: float, z0: float, z1: float, paint: BGR) -> None:
    odo = cv.scene.conditions.odometer_m
    polys = []
    for k in cv.indices(period, z0, z1):
        a = k * period - odo
        b = a + dash
        if b <= z0 * 0.5 or a >= z1:
            continue
        polys.append(cv.ground_band(x - w / 2, x + w / 2, max(a, 0.4), b))
    cv.polys(polys, paint, aa=True)


def _zebra(cv: Canvas, paint: BGR) -> None:
    """A pedestrian crossing, fixed in the world every 120 m."""
    c = cv.scene.conditions
    for k in cv.indices(120.0, 4.0, 60.0):
        z = k * 120.0 + 30.0 * hash01(c.layout_seed, 21, k) - c.odometer_m
        if not 4.0 <= z <= 60.0:
            continue
        x = cv.xl + 0.3
        polys = []
        while x < cv.xr - 0.3:
            polys.append(cv.ground_band(x, x + 0.5, z, z + 3.0))
            x += 1.0
        cv.polys(polys, paint, aa=True)


def _bays(cv: Canvas, z0: float, z1: float, paint: BGR) -> None:
    """Parking bays either side of the aisle: lines across every 2.6 m, and the bays' ends."""
    c = cv.scene.conditions
    polys = []
    for side in (-1, 1):
        inner = cv.xr if side > 0 else cv.xl
        outer = inner + side * 5.0
        a, b = min(inner, outer), max(inner, outer)
        for k in cv.indices(2.6, z0, min(z1, 90.0)):
            z = k * 2.6 - c.odometer_m
            if z > 0.5:
                polys.append(cv.ground_band(a, b, z, z + 0.12))
        end = outer + side * 0.1
        polys.append(cv.ground_band(min(outer, end), max(outer, end), z0, 90.0))
        # the row behind: another aisle edge and bays facing away
        far = outer + side * 6.5
        polys.append(cv.ground_band(min(far, far + side * 0.12), max(far, far + side * 0.12), z0, 90.0))
    cv.polys(polys, paint, aa=True)


def light_ground(cv: Canvas) -> None:
    """Ambient light, headlights and fog for every ground row at once (see :class:`.Look`)."""
    p = cv.proj
    y0 = min(cv.H, max(0, int(math.floor(p.horizon_y))))
    if y0 >= cv.H:
        return
    ys = np.arange(y0, cv.H, dtype=np.float64) + 0.5
    zs = np.minimum(p.f * p.cam_h / np.maximum(ys - p.horizon_y, 1e-3), Z_FAR * 4)
    mul, add = cv.look.row_light(zs)
    region = cv.img[y0:].astype(np.float32)
    region *= mul[:, None, :]
    region += add[:, None, :]
    np.clip(region, 0, 255, out=region)
    cv.img[y0:] = region.astype(np.uint8)
