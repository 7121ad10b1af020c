"""Generated images for smoke runs, tests and benchmarks (no data set can be downloaded).

Each image is a seeded random scene: a two-colour gradient "sky/road", a horizon line,
a few filled shapes and some texture. They carry no labels and mean nothing; they only
vary enough that a teacher's embeddings differ from image to image.

    retrofit-model synth-images --out runs/synthetic --count 512
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One BGR uint8 scene."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    img = (top * (1 - t) + bottom * t).repeat(width, axis=1).astype(np.uint8)
    horizon = int(rng.uniform(0.3, 0.7) * height)
    img[horizon:] = (img[horizon:] * rng.uniform(0.3, 0.9)).astype(np.uint8)
    for _ in range(int(rng.integers(1, 6))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(max(2, min(height, width) // 10), max(3, min(height, width) // 3)))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), size, color, -1)
        else:
            cv2.rectangle(img, (cx - size, cy - size // 2), (cx + size, cy + size // 2), color, -1)
    if rng.random() < 0.5:  # stripes: a little high-frequency texture
        period = int(rng.integers(3, 12))
        img[:, ::period] = (img[:, ::period] * 0.6).astype(np.uint8)
    noise = rng.normal(0, rng.uniform(0, 12), img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_images(
    out: Path, count: int, seed: int = 0, size: tuple[int, int] = (72, 96), ext: str = ".png"
) -> list[Path]:
    """Write ``count`` scenes of varying aspect (height x width around ``size``) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h = int(size[0] * rng.uniform(0.8, 1.2))
        w = int(size[1] * rng.uniform(0.8, 1.2))
        path = out / f"scene-{i:06d}{ext}"
        if not cv2.imwrite(str(path), scene(rng, h, w)):
            raise OSError(f"cannot write {path}")
        paths.append(path)
    return paths
