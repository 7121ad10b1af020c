"""Labelled instances: people, cyclists, vehicles, traffic lights, signs, cones, barriers.

Every figure is drawn inside its own projected box (:meth:`Projection.box`), so the box
written to the JSONL is exactly where the pixels are. Shapes carry the label, not colour
alone: a stop sign is an octagon with a word, a yield sign a point-down triangle, a bus a
tall body with a row of windows, a bicycle two thin rings under a rider.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from retrofit_agent.train.world.canvas import ONE, SHIFT, Canvas
from retrofit_agent.train.world.look import BGR
from retrofit_agent.train.world.scene import Thing

_LAMP = {"red": (40, 35, 250), "yellow": (0, 185, 255), "green": (150, 250, 60)}
_LAMP_OFF = {"red": (35, 35, 70), "yellow": (30, 60, 75), "green": (50, 70, 40)}
_LAMP_ROW = {"red": 0, "yellow": 1, "green": 2}
_DARK: BGR = (28, 28, 30)
_GLASS: BGR = (70, 55, 45)


def draw(cv: Canvas, t: Thing) -> None:
    x0, y0, x1, y1 = cv.proj.box(t)
    _DRAW[t.kind](cv, t, x0, y0, x1, y1)


def _shadow(cv: Canvas, t: Thing, x0: float, x1: float, y1: float) -> None:
    if cv.look.time == "day" and cv.look.weather in ("clear", "cloudy"):
        # A patch of ground 0.3 m deep seen from camera height: thin, and thinner with depth.
        w, depth = x1 - x0, cv.proj.f * cv.proj.cam_h * 0.3 / (t.z * t.z)
        col = cv.look.thing((35, 35, 35), t.z)
        cv2.ellipse(
            cv.img,
            (int((x0 + x1) / 2 * ONE), int(y1 * ONE)),
            (max(1, int(w * 0.55 * ONE)), max(1, int(depth * ONE))),
            0,
            0,
            360,
            col,
            -1,
            cv2.LINE_AA,
            SHIFT,
        )


def _mirror(t: Thing, x0: float, x1: float):
    """x mapper for side views: 0 is the rear, 1 the front, whichever way it faces."""
    if t.facing_left:
        return lambda u: x1 - u * (x1 - x0)
    return lambda u: x0 + u * (x1 - x0)


# ---------------------------------------------------------------------------------- people


def pedestrian(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    shirt, trousers, skin, extra = (sh(c, t.z) for c in t.colours)
    h, cx = y1 - y0, (x0 + x1) / 2
    _shadow(cv, t, x0, x1, y1)
    swing = math.sin(2 * math.pi * t.phase)
    lw = max(1.0, 0.085 * h)
    hip = y0 + 0.52 * h
    if t.view == "side":
        fwd = -1 if t.facing_left else 1
        for s in (1, -1):  # legs and arms swing in opposite phase
            cv.line(cx, hip, cx + fwd * s * swing * 0.16 * h, y1 - lw / 2, trousers, lw * 1.1)
        cv.line(cx, y0 + 0.2 * h, cx - fwd * swing * 0.12 * h, y0 + 0.5 * h, shirt, lw)
        cv.rect(cx - 0.085 * h, y0 + 0.17 * h, cx + 0.085 * h, hip + 0.02 * h, shirt)
        cv.line(cx, y0 + 0.2 * h, cx + fwd * swing * 0.12 * h, y0 + 0.5 * h, extra, lw)
    else:
        bw = 0.13 * h
        spread = 0.02 * h * swing
        for s in (-1, 1):
            cv.rect(
                cx + s * 0.012 * h + (0 if s > 0 else -0.075 * h) + s * spread,
                hip - 0.01 * h,
                cx + s * 0.012 * h + (0.075 * h if s > 0 else 0) + s * spread,
                y1,
                trousers,
            )
            cv.rect(cx + s * bw, y0 + 0.19 * h, cx + s * (bw + 0.05 * h), y0 + 0.5 * h, shirt)
        coat = 0.68 if t.colours[3][0] % 3 == 0 else 0.0  # some wear long coats
        cv.rect(cx - bw, y0 + 0.17 * h, cx + bw, y0 + max(0.54, coat) * h, shirt)
    r = 0.075 * h
    cv.circle(cx, y0 + r + 0.005 * h, r, skin)
    hair = sh((30, 40, 60) if t.colours[3][1] % 2 else (40, 90, 140), t.z)
    cv2.ellipse(
        cv.img,
        (int(cx * ONE), int((y0 + r) * ONE)),
        (max(1, int(r * ONE)), max(1, int(r * 0.8 * ONE))),
        0,
        180,
        360,
        hair,
        -1,
        cv2.LINE_AA,
        SHIFT,
    )


def cyclist(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    frame, jersey, skin, legs = (sh(c, t.z) for c in t.colours)
    h = y1 - y0
    X = _mirror(t, x0, x1)
    r = 0.2 * h
    tyre = sh(_DARK, t.z)
    thick = max(1, int(round(0.035 * h)))
    rear, front = (
        (X(0.0) + (r if not t.facing_left else -r), y1 - r),
        (X(1.0) - (r if not t.facing_left else -r), y1 - r),
    )
    _shadow(cv, t, x0, x1, y1)
    for cx, cy in (rear, front):  # thin rings: the bicycle's signature
        cv.circle(cx, cy, r, tyre, thick)
        cv.circle(cx, cy, max(1.0, 0.12 * r), sh((150, 150, 150), t.z))
    crank = (X(0.47), y1 - r)
    seat = (X(0.38), y1 - 0.55 * h)
    bars = (X(0.8), y1 - 0.58 * h)
    fw = max(1.0, 0.03 * h)
    for a, b in ((rear, crank), (crank, seat), (seat, rear), (crank, bars), (seat, bars), (bars, front)):
        cv.line(a[0], a[1], b[0], b[1], frame, fw)
    shoulder = (X(0.62), y0 + 0.24 * h)
    cv.line(seat[0], seat[1], shoulder[0], shoulder[1], jersey, max(1.0, 0.11 * h))  # leaning torso
    cv.line(shoulder[0], shoulder[1], bars[0], bars[1], skin, max(1.0, 0.045 * h))
    ang = 2 * math.pi * t.phase
    for s in (0.0, math.pi):
        px, py = (
            crank[0] + 0.1 * h * math.cos(ang + s) * (-1 if t.facing_left else 1),
            crank[1] + 0.1 * h * math.sin(ang + s),
        )
        knee = ((seat[0] + px) / 2 + (X(0.6) - X(0.5)), (seat[1] + py) / 2 - 0.05 * h)
        cv.line(seat[0], seat[1], knee[0], knee[1], legs, max(1.0, 0.06 * h))
        cv.line(knee[0], knee[1], px, py, legs, max(1.0, 0.05 * h))
    head = (X(0.7), y0 + 0.1 * h)
    cv.circle(head[0], head[1], 0.085 * h, skin)
    cv2.ellipse(
        cv.img,
        (int(head[0] * ONE), int((head[1] - 0.01 * h) * ONE)),
        (max(1, int(0.1 * h * ONE)), max(1, int(0.07 * h * ONE))),
        0,
        180,
        360,
        frame,
        -1,
        cv2.LINE_AA,
        SHIFT,
    )  # helmet


# ---------------------------------------------------------------------------------- vehicles


def vehicle(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    _shadow(cv, t, x0, x1, y1)
    if t.label == "motorcycle":
        (_moto_side if t.view == "side" else _moto_rear)(cv, t, x0, y0, x1, y1)
    elif t.view == "side":
        {"car": _car_side, "truck": _truck_side, "bus": _bus_side}[t.label](cv, t, x0, y0, x1, y1)
    else:
        {"car": _car_end, "truck": _truck_end, "bus": _bus_end}[t.label](cv, t, x0, y0, x1, y1)


def _lights(cv: Canvas, t: Thing, pts: list[tuple[float, float]], size: float) -> None:
    """Tail lights (red) from behind, headlights (white) from the front; lit from dusk on."""
    front = t.view == "front"
    on = cv.look.time != "day" or cv.look.weather in ("fog", "rain", "snow")
    colour: BGR = (200, 235, 250) if front else (40, 40, 220)
    col = cv.look.emit(colour, t.z) if on else cv.look.thing((150, 160, 170) if front else (40, 40, 170), t.z)
    ground = cv.proj.py(0, t.z)
    for x, y in pts:
        cv.rect(x - size, y - size * 0.6, x + size, y + size * 0.6, col)
        if on:
            cv.glow(x, y, max(1.5, size * 2.5), (90, 110, 140) if front else (20, 20, 120), ground_y=ground)


def _wheel(cv: Canvas, t: Thing, x: float, y: float, r: float) -> None:
    cv.circle(x, y, r, cv.look.thing(_DARK, t.z))
    cv.circle(x, y, r * 0.5, cv.look.thing((140, 140, 140), t.z))


def _car_end(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    w, h = x1 - x0, y1 - y0
    body, glass, dark = sh(t.colours[0], t.z), sh(_GLASS, t.z), sh(_DARK, t.z)
    for s in (0.04, 0.78):
        cv.rect(x0 + s * w, y1 - 0.16 * h, x0 + (s + 0.18) * w, y1, dark)
    cv.poly(
        [(x0 + 0.14 * w, y0 + 0.45 * h), (x0 + 0.24 * w, y0), (x1 - 0.24 * w, y0), (x1 - 0.14 * w, y0 + 0.45 * h)],
        body,
        aa=True,
    )
    cv.poly(
        [
            (x0 + 0.2 * w, y0 + 0.42 * h),
            (x0 + 0.27 * w, y0 + 0.07 * h),
            (x1 - 0.27 * w, y0 + 0.07 * h),
            (x1 - 0.2 * w, y0 + 0.42 * h),
        ],
        glass,
        aa=True,
    )
    cv.rect(x0, y0 + 0.42 * h, x1, y1 - 0.12 * h, body)
    cv.rect(x0 + 0.02 * w, y1 - 0.22 * h, x1 - 0.02 * w, y1 - 0.12 * h, dark)  # bumper
    cv.rect(x0 + 0.4 * w, y0 + 0.62 * h, x1 - 0.4 * w, y0 + 0.74 * h, sh((235, 235, 235), t.z))  # plate
    if t.view == "front":
        cv.rect(x0 + 0.3 * w, y0 + 0.5 * h, x1 - 0.3 * w, y0 + 0.6 * h, dark)  # grille
    _lights(cv, t, [(x0 + 0.11 * w, y0 + 0.53 * h), (x1 - 0.11 * w, y0 + 0.53 * h)], 0.07 * w)


def _car_side(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    X = _mirror(t, x0, x1)
    h = y1 - y0
    body, glass = sh(t.colours[0], t.z), sh(_GLASS, t.z)
    cv.poly(
        [
            (X(0.02), y1 - 0.15 * h),
            (X(0.0), y0 + 0.42 * h),
            (X(0.22), y0 + 0.38 * h),
            (X(0.32), y0),
            (X(0.7), y0),
            (X(0.8), y0 + 0.38 * h),
            (X(1.0), y0 + 0.48 * h),
            (X(0.99), y1 - 0.15 * h),
        ],
        body,
        aa=True,
    )
    cv.poly(
        [(X(0.3), y0 + 0.38 * h), (X(0.36), y0 + 0.08 * h), (X(0.5), y0 + 0.08 * h), (X(0.5), y0 + 0.38 * h)],
        glass,
        aa=True,
    )
    cv.poly(
        [(X(0.53), y0 + 0.38 * h), (X(0.53), y0 + 0.08 * h), (X(0.68), y0 + 0.08 * h), (X(0.76), y0 + 0.38 * h)],
        glass,
        aa=True,
    )
    r = 0.21 * h
    for u in (0.19, 0.8):
        _wheel(cv, t, X(u), y1 - r, r)


def _truck_end(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    w, h = x1 - x0, y1 - y0
    box, dark = sh(t.colours[0], t.z), sh(_DARK, t.z)
    for s in (0.03, 0.72):
        cv.rect(x0 + s * w, y1 - 0.12 * h, x0 + (s + 0.25) * w, y1, dark)  # twin wheels
    if t.view == "front":  # the cab: a windscreen high up, a grille below
        cv.rect(x0, y0 + 0.05 * h, x1, y1 - 0.1 * h, sh(t.colours[1], t.z))
        cv.rect(x0 + 0.06 * w, y0 + 0.12 * h, x1 - 0.06 * w, y0 + 0.42 * h, sh(_GLASS, t.z))
        cv.rect(x0 + 0.2 * w, y0 + 0.55 * h, x1 - 0.2 * w, y0 + 0.78 * h, dark)
        _lights(cv, t, [(x0 + 0.1 * w, y0 + 0.82 * h), (x1 - 0.1 * w, y0 + 0.82 * h)], 0.05 * w)
        return
    cv.rect(x0, y0, x1, y1 - 0.14 * h, box)  # the cargo box: tall, plain, no window
    seam = sh(tuple(v * 0.6 for v in t.colours[0]), t.z)  # type: ignore[arg-type]
    cv.line((x0 + x1) / 2, y0 + 0.03 * h, (x0 + x1) / 2, y1 - 0.16 * h, seam, max(1.0, 0.01 * w))
    for u in (0.25, 0.75):
        cv.line(x0 + u * w, y0 + 0.05 * h, x0 + u * w, y1 - 0.16 * h, seam, max(1.0, 0.006 * w))
    cv.rect(x0, y1 - 0.16 * h, x1, y1 - 0.12 * h, dark)
    _lights(cv, t, [(x0 + 0.08 * w, y1 - 0.2 * h), (x1 - 0.08 * w, y1 - 0.2 * h)], 0.05 * w)


def _truck_side(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    X = _mirror(t, x0, x1)
    h = y1 - y0
    cv.poly(
        [(X(0.0), y0), (X(0.76), y0), (X(0.76), y1 - 0.16 * h), (X(0.0), y1 - 0.16 * h)], sh(t.colours[0], t.z), aa=True
    )
    cab = sh(t.colours[1], t.z)
    cv.poly(
        [
            (X(0.78), y0 + 0.22 * h),
            (X(0.97), y0 + 0.22 * h),
            (X(1.0), y0 + 0.45 * h),
            (X(1.0), y1 - 0.14 * h),
            (X(0.78), y1 - 0.14 * h),
        ],
        cab,
        aa=True,
    )
    cv.poly(
        [(X(0.88), y0 + 0.27 * h), (X(0.96), y0 + 0.27 * h), (X(0.985), y0 + 0.45 * h), (X(0.88), y0 + 0.45 * h)],
        sh(_GLASS, t.z),
        aa=True,
    )
    cv.poly(
        [(X(0.0), y1 - 0.2 * h), (X(1.0), y1 - 0.2 * h), (X(1.0), y1 - 0.15 * h), (X(0.0), y1 - 0.15 * h)],
        sh(_DARK, t.z),
    )
    r = 0.13 * h
    for u in (0.08, 0.17, 0.62, 0.9):
        _wheel(cv, t, X(u), y1 - r, r)


def _bus_end(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    w, h = x1 - x0, y1 - y0
    body, glass, dark = sh(t.colours[0], t.z), sh(_GLASS, t.z), sh(_DARK, t.z)
    for s in (0.05, 0.75):
        cv.rect(x0 + s * w, y1 - 0.1 * h, x0 + (s + 0.2) * w, y1, dark)
    cv.rect(x0, y0, x1, y1 - 0.07 * h, body)
    big = 0.5 if t.view == "front" else 0.38  # windscreen (front) or rear window: the bus's wide glass
    cv.rect(x0 + 0.05 * w, y0 + 0.12 * h, x1 - 0.05 * w, y0 + big * h, glass)
    led = cv.look.emit((0, 170, 255), t.z)  # route display
    cv.rect(x0 + 0.15 * w, y0 + 0.03 * h, x1 - 0.15 * w, y0 + 0.1 * h, dark)
    cv.rect(x0 + 0.25 * w, y0 + 0.05 * h, x1 - 0.35 * w, y0 + 0.08 * h, led)
    if t.view != "front":
        for u in (0.62, 0.68, 0.74):
            cv.line(x0 + 0.3 * w, y0 + u * h, x1 - 0.3 * w, y0 + u * h, dark, max(1.0, 0.012 * h))  # engine grille
    _lights(cv, t, [(x0 + 0.08 * w, y0 + 0.78 * h), (x1 - 0.08 * w, y0 + 0.78 * h)], 0.045 * w)


def _bus_side(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    X = _mirror(t, x0, x1)
    h = y1 - y0
    body, glass = sh(t.colours[0], t.z), sh(_GLASS, t.z)
    cv.poly(
        [(X(0.0), y0 + 0.02 * h), (X(1.0), y0 + 0.02 * h), (X(1.0), y1 - 0.1 * h), (X(0.0), y1 - 0.1 * h)],
        body,
        aa=True,
    )
    if cv.look.time != "day":  # a bus is lit inside after dark
        glass = cv.look.emit((120, 200, 230), t.z)
    cv.poly(
        [(X(0.03), y0 + 0.15 * h), (X(0.98), y0 + 0.15 * h), (X(0.98), y0 + 0.5 * h), (X(0.03), y0 + 0.5 * h)], glass
    )
    pillars = []
    for u in np.arange(0.03, 0.98, 0.085):  # the row of side windows
        pillars.append(
            np.array(
                [
                    (X(u), y0 + 0.15 * h),
                    (X(u + 0.012), y0 + 0.15 * h),
                    (X(u + 0.012), y0 + 0.5 * h),
                    (X(u), y0 + 0.5 * h),
                ]
            )
        )
    cv.polys(pillars, body)
    cv.poly(
        [(X(0.86), y0 + 0.15 * h), (X(0.94), y0 + 0.15 * h), (X(0.94), y1 - 0.12 * h), (X(0.86), y1 - 0.12 * h)], glass
    )  # door
    r = 0.15 * h
    for u in (0.18, 0.83):
        _wheel(cv, t, X(u), y1 - r, r)


def _moto_side(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    X = _mirror(t, x0, x1)
    h = y1 - y0
    r = 0.22 * h
    for u in (0.2, 0.8):
        cv.circle(X(u), y1 - r, r, sh(_DARK, t.z))  # fat solid tyres, not rings
        cv.circle(X(u), y1 - r, r * 0.35, sh((160, 160, 160), t.z))
    body = sh(t.colours[0], t.z)
    cv.poly(
        [
            (X(0.25), y1 - 0.3 * h),
            (X(0.3), y1 - 0.55 * h),
            (X(0.72), y1 - 0.6 * h),
            (X(0.78), y1 - 0.38 * h),
            (X(0.55), y1 - 0.22 * h),
        ],
        body,
        aa=True,
    )  # tank, engine and fairing in one block
    cv.rect(min(X(0.4), X(0.58)), y1 - 0.32 * h, max(X(0.4), X(0.58)), y1 - 0.18 * h, sh((90, 90, 95), t.z))  # engine
    rider = sh(t.colours[1], t.z)
    cv.line(X(0.42), y1 - 0.6 * h, X(0.52), y0 + 0.2 * h, rider, max(1.0, 0.13 * h))
    cv.line(X(0.52), y0 + 0.22 * h, X(0.74), y1 - 0.66 * h, rider, max(1.0, 0.06 * h))
    cv.line(X(0.42), y1 - 0.55 * h, X(0.55), y1 - 0.35 * h, sh(_DARK, t.z), max(1.0, 0.08 * h))
    cv.circle(X(0.53), y0 + 0.1 * h, 0.1 * h, rider)  # helmet
    cv.circle(X(0.57), y0 + 0.1 * h, 0.045 * h, sh(_DARK, t.z))  # visor


def _moto_rear(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    cv.rect(cx - 0.11 * w, y1 - 0.3 * h, cx + 0.11 * w, y1, sh(_DARK, t.z))  # the fat rear tyre
    cv.rect(cx - 0.24 * w, y1 - 0.48 * h, cx + 0.24 * w, y1 - 0.28 * h, sh(t.colours[0], t.z))
    rider = sh(t.colours[1], t.z)
    cv.poly(
        [
            (cx - 0.3 * w, y0 + 0.62 * h),
            (cx - 0.26 * w, y0 + 0.2 * h),
            (cx + 0.26 * w, y0 + 0.2 * h),
            (cx + 0.3 * w, y0 + 0.62 * h),
        ],
        rider,
        aa=True,
    )
    cv.line(x0, y0 + 0.42 * h, x1, y0 + 0.42 * h, sh(_DARK, t.z), max(1.0, 0.03 * h))  # handlebar and mirrors
    for x in (x0 + 0.03 * w, x1 - 0.03 * w):
        cv.circle(x, y0 + 0.36 * h, 0.035 * h, sh(_DARK, t.z))
    cv.circle(cx, y0 + 0.1 * h, 0.1 * h, rider)
    cv.rect(cx - 0.1 * w, y0 + 0.08 * h, cx + 0.1 * w, y0 + 0.13 * h, sh(_DARK, t.z))
    _lights(cv, t, [(cx, y1 - 0.52 * h)], 0.1 * w)


# ---------------------------------------------------------------------------------- signals


def traffic_light(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    p, sh = cv.proj, cv.look.thing
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    pole = sh((80, 80, 80), t.z)
    pw = max(1.0, 0.16 * p.scale(t.z))
    if t.pole_m > 0:
        cv.rect(cx - pw / 2, y1, cx + pw / 2, p.py(0, t.z), pole)
    else:  # hanging from a mast arm that reaches in from a pole beside the road
        base_x = cv.xr + 0.8 if t.x >= (cv.xl + cv.xr) / 2 - 1 else cv.xl - 0.8
        bx = p.px(base_x, t.z)
        ty = y0 - 0.1 * h
        cv.line(cx, ty, bx, ty, pole, pw)
        cv.line(cx, ty, cx, y0, pole, pw * 0.6)
        cv.rect(bx - pw / 2, ty, bx + pw / 2, p.py(0, t.z), pole)
    cv.rect(
        x0 - 0.08 * w,
        y0 - 0.03 * h,
        x1 + 0.08 * w,
        y1 + 0.03 * h,
        sh((215, 215, 210) if t.colours[0][2] > 60 else _DARK, t.z),
    )
    cv.rect(x0, y0, x1, y1, sh(t.colours[0], t.z))
    r = 0.36 * w
    lit = _LAMP_ROW[t.label]
    for row, name in enumerate(("red", "yellow", "green")):
        ly = y0 + (row + 0.5) * h / 3
        if row == lit:
            lamp = t.colours[1] if len(t.colours) > 1 else _LAMP[name]
            cv.circle(cx, ly, r, cv.look.emit(lamp, t.z))
            cv.glow(cx, ly, r * 2.6, tuple(int(v * 0.8) for v in lamp), ground_y=cv.proj.py(0, t.z))  # type: ignore[arg-type]
        else:
            cv.circle(cx, ly, r, sh(_LAMP_OFF[name], t.z))


def sign(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    p, sh = cv.proj, cv.look.thing
    d = x1 - x0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    pw = max(1.0, 0.08 * p.scale(t.z))
    if t.pole_m > 0:
        cv.rect(cx - pw / 2, y1 - 0.05 * d, cx + pw / 2, p.py(0, t.z), sh((120, 120, 120), t.z))
    else:  # on a gantry spanning the road
        _gantry(cv, t.z, t.elevation_m + t.height_m)
    red_paint, white_paint = t.colours if len(t.colours) == 2 else ((35, 30, 200), (235, 235, 235))
    white, red = _reflect(cv, white_paint, t.z), _reflect(cv, red_paint, t.z)
    if t.label == "stop":
        cv.poly(_octagon(cx, cy, d / 2), white, aa=True)
        cv.poly(_octagon(cx, cy, d / 2 * 0.86), red, aa=True)
        _text(cv, "STOP", cx, cy, 0.74 * d, white)
    elif t.label == "speed_limit":
        cv.circle(cx, cy, d / 2, red)
        cv.circle(cx, cy, d / 2 * 0.74, white)
        _text(cv, str(t.number), cx, cy, (0.62 if t.number >= 100 else 0.5) * d, _reflect(cv, (20, 20, 20), t.z))
    else:  # yield: a triangle pointing down, red rim, white centre
        tri = np.array([(x0, y0), (x1, y0), (cx, y1)])
        cv.poly(tri, red, aa=True)
        inner = np.array([(cx + (x - cx) * 0.58, y0 + 0.16 * d + (y - y0) * 0.58) for x, y in tri])
        cv.poly(inner, white, aa=True)


def _gantry(cv: Canvas, z: float, under: float) -> None:
    p = cv.proj
    steel = cv.look.thing((150, 150, 150), z)
    xa, xb = p.px(cv.xl - 1.0, z), p.px(cv.xr + 1.0, z)
    top, ground = p.py(under + 0.45, z), p.py(0, z)
    cv.rect(xa, top, xb, p.py(under, z), steel)
    leg = 0.25 * p.scale(z)
    for x in (xa, xb):
        cv.rect(x - leg, top, x + leg, ground, steel)


def _reflect(cv: Canvas, colour: BGR, z: float) -> BGR:
    base = cv.look.thing(colour, z)
    if cv.look.time == "day":
        return base
    boost = 1.0 + 1.2 * math.exp(-z / 30.0)
    return tuple(int(min(255, v * boost)) for v in base)  # type: ignore[return-value]


def _octagon(cx: float, cy: float, r: float) -> np.ndarray:
    a = np.pi / 8 + np.arange(8) * np.pi / 4
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)


def _text(cv: Canvas, text: str, cx: float, cy: float, width: float, colour: BGR) -> None:
    """Text centred on (cx, cy), scaled to ``width`` pixels; a bar where it would be a smudge."""
    if width < 7:  # too small for glyphs: one blob per character, as a blurred camera shows it
        n = len(text)
        step = width / n
        for i in range(n):
            x = cx - width / 2 + (i + 0.5) * step
            cv.rect(x - step * 0.35, cy - width * 0.2, x + step * 0.35, cy + width * 0.2, colour)
        return
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 2)
    scale = width / tw
    thick = max(1, int(round(scale * 2.2)))
    (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
    cv2.putText(
        cv.img, text, (int(round(cx - tw / 2)), int(round(cy + th / 2))), font, scale, colour, thick, cv2.LINE_AA
    )


def cone(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    orange, white = sh(t.colours[0], t.z), _reflect(cv, (235, 235, 235), t.z)
    cv.rect(x0, y1 - 0.08 * h, x1, y1, sh(_DARK, t.z))
    cv.poly(
        [(x0 + 0.12 * w, y1 - 0.08 * h), (cx - 0.06 * w, y0), (cx + 0.06 * w, y0), (x1 - 0.12 * w, y1 - 0.08 * h)],
        orange,
        aa=True,
    )
    for a, b in ((0.3, 0.42), (0.55, 0.64)):
        wa, wb = 0.06 + 0.38 * a, 0.06 + 0.38 * b
        cv.poly(
            [
                (cx - wb * w, y0 + b * h),
                (cx - wa * w, y0 + a * h),
                (cx + wa * w, y0 + a * h),
                (cx + wb * w, y0 + b * h),
            ],
            white,
            aa=True,
        )


def barrier(cv: Canvas, t: Thing, x0: float, y0: float, x1: float, y1: float) -> None:
    sh = cv.look.thing
    w, h = x1 - x0, y1 - y0
    dark = sh((60, 60, 60), t.z)
    for u in (0.1, 0.85):
        cv.rect(x0 + u * w, y0 + 0.3 * h, x0 + (u + 0.05) * w, y1, dark)
    white, colour = _reflect(cv, (235, 235, 235), t.z), _reflect(cv, t.colours[0], t.z)
    cv.rect(x0, y0 + 0.12 * h, x1, y0 + 0.5 * h, white)
    stripes, step = [], 0.38 * h
    x = x0 - 0.4 * h
    while x < x1:  # diagonal stripes; x clamped to the board so none overhangs its ends
        q = np.array(
            [
                (x, y0 + 0.5 * h),
                (x + step * 0.5, y0 + 0.5 * h),
                (x + step * 0.5 + 0.38 * h, y0 + 0.12 * h),
                (x + 0.38 * h, y0 + 0.12 * h),
            ]
        )
        q[:, 0] = np.clip(q[:, 0], x0, x1)
        stripes.append(q)
        x += step
    cv.polys(stripes, colour, aa=True)
    lamp = cv.look.emit((0, 200, 255), t.z) if cv.look.time != "day" else sh((0, 160, 230), t.z)
    cv.circle(x0 + 0.12 * w, y0 + 0.06 * h, 0.06 * h, lamp)
    if cv.look.time != "day":
        cv.glow(x0 + 0.12 * w, y0 + 0.06 * h, 0.2 * h, (0, 90, 140))


_DRAW = {
    "pedestrian": pedestrian,
    "cyclist": cyclist,
    "vehicle": vehicle,
    "traffic_light": traffic_light,
    "sign": sign,
    "cone": cone,
    "barrier": barrier,
}
