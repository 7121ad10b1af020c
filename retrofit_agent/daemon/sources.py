"""Frame sources through OpenCV: which backend a source needs, opening it, and what about a
source waiting cannot fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from retrofit_agent.contract.errors import CaptureError
from retrofit_agent.daemon.config import CameraConfig


class VideoSource(Protocol):
    """The subset of ``cv2.VideoCapture`` the grabber uses."""

    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...
    def get(self, prop: int) -> float: ...


def resolve_kind(cfg: CameraConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    src = cfg.source.strip()
    if src.isdigit() or src.startswith("/dev/video"):
        return "v4l2"
    if "://" in src:
        return "url"
    if "!" in src and "appsink" in src:
        return "gstreamer"
    return "file"


def camera_id(cfg: CameraConfig) -> str:
    if cfg.id:
        return cfg.id
    src = cfg.source.strip()
    if "://" in src:
        return src.split("://", 1)[1].split("@")[-1].split("?")[0]  # never leak credentials
    return Path(src).name if "!" not in src else "gstreamer"


def _opencv_has_gstreamer() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def check_source(cfg: CameraConfig) -> None:
    """Refuse at start-up what waiting for a live source cannot fix. Raises CaptureError (exit 2).

    (A file is opened at start-up, so a missing one fails there.)
    """
    if resolve_kind(cfg) == "gstreamer" and not _opencv_has_gstreamer():
        raise CaptureError(
            "camera.source: a GStreamer pipeline needs an OpenCV build with GStreamer support (the PyPI wheel has none)"
        )


def open_source(cfg: CameraConfig) -> cv2.VideoCapture:
    """Open ``cfg.source`` with the backend its kind calls for. Raises CaptureError."""
    kind = resolve_kind(cfg)
    src = cfg.source.strip()
    if kind == "file" and not os.path.isfile(src):
        raise CaptureError(f"camera.source: video file not found: {src}")
    if kind == "v4l2":
        device: int | str = int(src) if src.isdigit() else src
        if isinstance(device, str) and not os.path.exists(device):
            raise CaptureError(f"camera.source: no such device {src} (is the camera plugged in?)")
        cap = cv2.VideoCapture(device, cv2.CAP_V4L2)
    elif kind == "url":
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(cfg.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(cfg.read_timeout_s * 1000),
        ]
        cap = cv2.VideoCapture(src, cv2.CAP_FFMPEG, params)
    elif kind == "gstreamer":
        cap = cv2.VideoCapture(src, cv2.CAP_GSTREAMER)
    else:
        cap = cv2.VideoCapture(src, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise CaptureError(f"camera.source: cannot open {kind} source {src!r}")
    if kind == "v4l2":
        _apply_v4l2_settings(cap, cfg)
    return cap


def _apply_v4l2_settings(cap: cv2.VideoCapture, cfg: CameraConfig) -> None:
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver queue holds one frame: always the newest
    if cfg.fourcc:
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*cfg.fourcc))
    if cfg.width:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
    if cfg.height:
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
    if cfg.fps:
        cap.set(cv2.CAP_PROP_FPS, cfg.fps)
