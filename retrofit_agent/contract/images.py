"""Image-file discovery: one list of the suffixes every command accepts.

Training, calibration and evaluation read the same folders, so they must agree on what an
image is (a folder of TIFFs that distils must also calibrate and evaluate).
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def find_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursively, in a stable (sorted) order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))
