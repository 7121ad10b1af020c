"""Light halos, weather in the air, and the sensor's defects.

Rain and snow particles are drawn fresh for every picture (and every frame of a drive):
they are weather, not layout. Sensor defects come from the scene's :class:`Sensor`, so a
model meets noise, motion blur and exposure changes on every label instead of learning
one clean rendering.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from retrofit_agent.train.world.canvas import ONE, SHIFT, Canvas


def add_glows(cv: Canvas, wet: bool) -> None:
    """Blur every light's halo in one pass at quarter size and add it; on a wet road each
    light also leaves a streak of reflection on the road below it."""
    if not cv.glows:
        return
    q = 4
    h, w = max(8, cv.H // q), max(8, cv.W // q)
    layer = np.zeros((h, w, 3), np.uint8)
    sx, sy = w / cv.W, h / cv.H
    for x, y, rx, ry, colour, ground_y in cv.glows:
        # Three nested rings, brightest inside: a soft fall-off once blurred, not a disc.
        for k, gain in ((1.0, 0.35), (0.7, 0.65), (0.4, 1.0)):
            _ellipse(layer, x * sx, y * sy, rx * sx * k, ry * sy * k, tuple(int(c * gain) for c in colour))
        if wet and ground_y is not None and ground_y < cv.H:
            dim = tuple(int(c * 0.4) for c in colour)
            _ellipse(layer, x * sx, (ground_y + 2.5 * ry) * sy, 0.5 * rx * sx, 2.5 * ry * sy, dim)
    layer = cv2.GaussianBlur(layer, (0, 0), 1.2)
    cv2.add(cv.img, cv2.resize(layer, (cv.W, cv.H), interpolation=cv2.INTER_LINEAR), dst=cv.img)


def _ellipse(img: np.ndarray, x: float, y: float, rx: float, ry: float, colour: tuple) -> None:
    cv2.ellipse(
        img,
        (int(x * ONE), int(y * ONE)),
        (max(1, int(rx * ONE)), max(1, int(ry * ONE))),
        0,
        0,
        360,
        colour,
        -1,
        cv2.LINE_AA,
        SHIFT,
    )


def _falling(layer: np.ndarray, clock_s: float, vx: float, vy: float) -> np.ndarray:
    """The particle layer ``clock_s`` seconds on: one sheet sliding at (vx, vy) pixels per
    second, wrapping at the edges. Frames of a drive then differ by a shift, which video
    coding predicts, instead of by a fresh random spray (megabytes per second)."""
    if clock_s != 0:
        layer = np.roll(layer, (int(vy * clock_s) % layer.shape[0], int(vx * clock_s) % layer.shape[1]), axis=(0, 1))
    # Soft: streaks are motion-blurred and flakes out of focus; it also halves what a video
    # coder spends on them.
    return cv2.GaussianBlur(layer, (0, 0), 0.8)


def rain(cv: Canvas) -> None:
    W, H = cv.W, cv.H
    rng = np.random.default_rng([cv.scene.conditions.layout_seed, 17])  # the sheet is the segment's
    overlay = np.zeros_like(cv.img)
    n = int(W * H / 110 * cv.scene.conditions.precipitation)
    angle = math.radians(rng.uniform(-18, 18))
    length = rng.uniform(0.04, 0.1) * H
    xs, ys = rng.uniform(0, W, n), rng.uniform(0, H, n)
    ls = length * rng.uniform(0.5, 1.0, n)
    dx, dy = ls * math.sin(angle), ls * math.cos(angle)
    pts = np.stack([np.stack([xs, ys], 1), np.stack([xs + dx, ys + dy], 1)], 1)
    v = int(rng.uniform(150, 220))
    cv2.polylines(overlay, np.round(pts * ONE).astype(np.int32), False, (v, v, v), 1, cv2.LINE_AA, SHIFT)
    speed = 1.6 * H
    overlay = _falling(overlay, cv.scene.conditions.clock_s, speed * math.sin(angle), speed * math.cos(angle))
    cv2.addWeighted(
        cv.img, 1.0, overlay, rng.uniform(0.25, 0.45) * min(1.0, 0.4 + cv.scene.conditions.precipitation), 0, dst=cv.img
    )
    for _ in range(int(rng.integers(0, 14))):  # drops on the windscreen
        x, y, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0.008, 0.025) * H
        cv.circle(
            x,
            y,
            r,
            tuple(int(c) for c in np.clip(cv.img[min(H - 1, int(y)), min(W - 1, int(x))].astype(int) + 35, 0, 255)),
            1,
        )


def snow(cv: Canvas) -> None:
    W, H = cv.W, cv.H
    rng = np.random.default_rng([cv.scene.conditions.layout_seed, 19])
    scale = H / 200.0
    layer = np.zeros_like(cv.img)
    drift = rng.uniform(-0.1, 0.1) * W
    for depth, density, big in ((0, 1.0, 0.6), (1, 0.35, 2.0)):  # far fine flakes, near big ones (fall faster)
        n = int(W * H / 260 * cv.scene.conditions.precipitation * density)
        xs, ys = rng.uniform(0, W, n), rng.uniform(0, H, n)
        rs = (rng.random(n) ** 3 * big + 0.4) * scale
        sheet = np.zeros_like(cv.img)
        for x, y, r in zip(xs, ys, rs):
            v = int(225 + 30 * rng.random())
            cv2.circle(sheet, (int(x * ONE), int(y * ONE)), max(1, int(r * ONE)), (v, v, v), -1, cv2.LINE_AA, SHIFT)
        np.maximum(
            layer,
            _falling(sheet, cv.scene.conditions.clock_s, drift * (1 + depth), (0.12 + 0.2 * depth) * H),
            out=layer,
        )
    np.maximum(cv.img, layer, out=cv.img)


def fog_veil(cv: Canvas) -> None:
    """Fog also lifts the blacks of near things a little (scattered light in front of them)."""
    k = 0.12
    veil = np.empty_like(cv.img)
    veil[:] = np.clip(cv.look.fog_colour, 0, 255).astype(np.uint8)
    cv2.addWeighted(cv.img, 1 - k, veil, k, 0, dst=cv.img)


_NOISE_SIDE = 512


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """One fixed field of unit gaussian noise; each picture takes a random window of it
    (drawing fresh gaussians for every pixel costs more than the rest of the sensor)."""
    return np.random.default_rng(20240607).standard_normal((_NOISE_SIDE, _NOISE_SIDE, 3), dtype=np.float32)


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    if h > _NOISE_SIDE or w > _NOISE_SIDE:
        return rng.standard_normal((h, w, 3), dtype=np.float32)
    y, x = int(rng.integers(0, _NOISE_SIDE - h + 1)), int(rng.integers(0, _NOISE_SIDE - w + 1))
    window = _noise_bank()[y : y + h, x : x + w]
    return window[:, ::-1] if rng.random() < 0.5 else window


@lru_cache(maxsize=16)
def _radius2(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2
    return (r2 / 2)[:, :, None]


def sensor(cv: Canvas) -> None:
    """Motion blur, white balance and exposure, vignetting, then noise, in that order."""
    s = cv.scene.sensor
    img = cv.img
    if s.blur_px >= 1:
        k = int(math.ceil(s.blur_px)) * 2 + 1
        kernel = np.zeros((k, k), np.float32)
        c, a = k // 2, math.radians(s.blur_angle_deg)
        dx, dy = math.cos(a) * s.blur_px / 2, math.sin(a) * s.blur_px / 2
        cv2.line(kernel, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1)
        kernel /= max(1e-6, kernel.sum())
        img = cv2.filter2D(img, -1, kernel)
    if s.defocus_px > 0:
        img = cv2.GaussianBlur(img, (0, 0), s.defocus_px)
    x = img.astype(np.float32)
    x *= (np.asarray(s.gain, np.float32) * s.exposure)[None, None, :]
    vignette = float(cv.scene.conditions.palette[7] % 5) * 0.08
    if vignette:
        x *= 1.0 - vignette * _radius2(cv.H, cv.W)
    if s.noise > 0:
        # The window into the noise field is keyed by the layout, not the frame: a drive's
        # frames share it (fixed-pattern noise), which video coding predicts instead of
        # spending megabytes on; separate pictures still get different noise.
        window_rng = np.random.default_rng([cv.scene.conditions.layout_seed, 5])
        x += _noise(window_rng, cv.H, cv.W) * np.float32(s.noise)
    np.clip(x, 0, 255, out=x)
    cv.img[:] = x.astype(np.uint8)
