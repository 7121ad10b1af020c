"""A small synthetic driving clip, so the quick start and the tests need no camera.

Deterministic: a road in perspective with moving lane marks, a sky whose brightness
drifts (day → dusk), and boxes standing in for vehicles. It is not a real scene, and the
reference bundle's labels on it mean nothing; it exercises the pipeline end to end.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from retrofit_agent.contract.errors import ConfigError


def render_frame(i: int, width: int = 640, height: int = 360, n_frames: int = 150) -> np.ndarray:
    t = i / max(1, n_frames - 1)
    img = np.zeros((height, width, 3), dtype=np.uint8)
    horizon = int(height * 0.45)
    sky_top = np.array([235, 180, 110]) * (1.0 - 0.6 * t)  # BGR, darkens towards dusk
    for y in range(horizon):
        img[y] = (sky_top * (0.7 + 0.3 * y / horizon)).astype(np.uint8)
    img[horizon:] = (70, 75, 70)
    road = np.array(
        [[width * 0.05, height], [width * 0.95, height], [width * 0.55, horizon], [width * 0.45, horizon]], np.int32
    )
    cv2.fillPoly(img, [road], (60, 60, 60))
    for k in range(8):  # dashed centre line moving towards the camera
        s = ((k / 8.0) + t * 4) % 1.0
        y0, y1 = horizon + (height - horizon) * s**2, horizon + (height - horizon) * min(1.0, (s + 0.05)) ** 2
        w0, w1 = 1 + 6 * s, 1 + 6 * min(1.0, s + 0.05)
        pts = np.array(
            [[width / 2 - w0, y0], [width / 2 + w0, y0], [width / 2 + w1, y1], [width / 2 - w1, y1]], np.int32
        )
        cv2.fillPoly(img, [pts], (230, 230, 230))
    for lane, phase, colour in ((-1, 0.1, (40, 40, 200)), (1, 0.55, (200, 200, 200))):
        s = 0.25 + 0.6 * ((t + phase) % 1.0)
        cx = width / 2 + lane * s * width * 0.22
        cy = horizon + (height - horizon) * s * 0.8
        bw, bh = 90 * s, 60 * s
        cv2.rectangle(img, (int(cx - bw / 2), int(cy - bh)), (int(cx + bw / 2), int(cy)), colour, -1)
        cv2.rectangle(img, (int(cx - bw / 3), int(cy - bh)), (int(cx + bw / 3), int(cy - bh * 0.6)), (30, 30, 30), -1)
    return img


def write_clip(path: Path, n_frames: int = 150, fps: float = 15.0, size: tuple[int, int] = (640, 360)) -> Path:
    """Write the clip as MPEG-4 Part 2 (decodable by every OpenCV/FFmpeg build)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise ConfigError(f"cannot write video {path} (use a .mp4 or .avi name in a writable folder)")
    try:
        for i in range(n_frames):
            writer.write(render_frame(i, size[0], size[1], n_frames))
    finally:
        writer.release()
    return path


def read_clip_frames(path: Path, every: int = 1, limit: int | None = None) -> list[np.ndarray]:
    """Decode a clip's frames (every ``every``-th, at most ``limit``) as BGR arrays."""
    cap = cv2.VideoCapture(str(path))
    frames: list[np.ndarray] = []
    i = 0
    while limit is None or len(frames) < limit:
        ok, frame = cap.read()
        if not ok:
            break
        if i % every == 0:
            frames.append(frame)
        i += 1
    cap.release()
    if not frames:
        raise ValueError(f"no frames could be read from {path}")
    return frames
