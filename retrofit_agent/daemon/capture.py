"""Frame sources through OpenCV, and the grabber thread that keeps only the newest frame.

Live sources (V4L2, network streams, GStreamer) that fail or stall are released and
reopened with exponential back-off, forever: a camera going away never ends the daemon.
A video file ends the stream at its end unless looped. A stalled read may hang inside
native code, so a stall abandons the stuck thread (it exits when its read returns) and
starts a fresh one rather than waiting for it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import cv2
import numpy as np
import structlog

from retrofit_agent.daemon.config import CameraConfig
from retrofit_agent.contract.errors import CaptureError
from retrofit_agent.daemon.metrics import AgentMetrics

log = structlog.get_logger("retrofit_agent.daemon.capture")


class VideoSource(Protocol):
    """The subset of ``cv2.VideoCapture`` the grabber uses."""

    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...
    def get(self, prop: int) -> float: ...


@dataclass(frozen=True)
class Frame:
    image: np.ndarray
    frame_id: int
    captured_mono: float  # time.monotonic() when the read returned
    captured_wall: float  # time.time() at the same moment, for messages only
    prepared: Any = None  # what the grabber's ``prepare`` hook made of it (the model input)
    prepare_seconds: float = 0.0
    error: str | None = None  # why ``prepare`` rejected it
    prepared_with: Any = None  # the ``prepare`` callable used (a reload may have replaced it since)


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
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(cfg.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(cfg.read_timeout_s * 1000),
        ]
        cap = cv2.VideoCapture(src, cv2.CAP_FFMPEG, params)
    elif kind == "gstreamer":
        cap = cv2.VideoCapture(src, cv2.CAP_GSTREAMER)
    else:
        cap = cv2.VideoCapture(src, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        hint = " (this OpenCV build may lack GStreamer support)" if kind == "gstreamer" else ""
        raise CaptureError(f"camera.source: cannot open {kind} source {src!r}{hint}")
    if kind == "v4l2":
        _apply_v4l2_settings(cap, cfg)
    return cap


def _apply_v4l2_settings(cap: cv2.VideoCapture, cfg: CameraConfig) -> None:
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver queue holds one frame: always the newest
    if cfg.fourcc:
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*cfg.fourcc))
    if cfg.width:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
    if cfg.height:
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
    if cfg.fps:
        cap.set(cv2.CAP_PROP_FPS, cfg.fps)


class FrameGrabber:
    """Reads frames on a background thread and hands the frame loop the newest one.

    ``get()`` is the frame loop's only entry point: it waits for a frame newer than the
    last one returned, and is also where stalls are detected (the frame loop is the one
    thread that is never stuck in a camera driver).

    ``prepare`` (the model's preprocessing) runs on the grabber thread, so decoding and
    resizing the next frame overlap with inference on the current one.
    """

    def __init__(
        self,
        cfg: CameraConfig,
        metrics: AgentMetrics,
        opener: Callable[[CameraConfig], VideoSource] = open_source,
        clock: Callable[[], float] = time.monotonic,
        prepare: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.prepare = prepare
        self.kind = resolve_kind(cfg)
        self.live = self.kind != "file"
        self._metrics = metrics
        self._opener = opener
        self._clock = clock
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._latest: Frame | None = None
        self._consumed = True
        self._next_id = 0
        self._generation = 0
        self._last_progress = clock()
        self.finished = False  # a non-looping file reached its end
        self._reconnecting = False  # back-off waits are not stalls
        self._threads: list[threading.Thread] = []
        self._log = log.bind(camera=camera_id(cfg))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the source once synchronously (so a bad source fails start-up), then grab."""
        source = self._opener(self.cfg)
        self._spawn(source)

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = self._clock() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - self._clock()))

    def _spawn(self, source: VideoSource | None) -> None:
        with self._cond:
            self._generation += 1
            gen = self._generation
            self._last_progress = self._clock()
        t = threading.Thread(target=self._run, args=(gen, source), name=f"grabber-{gen}", daemon=True)
        self._threads = [th for th in self._threads if th.is_alive()] + [t]
        t.start()

    # ------------------------------------------------------------------ consumer side

    def get(self, timeout: float) -> Frame | None:
        """The newest unseen frame, or None after ``timeout`` (or once stopped/finished)."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._consumed and not self._stop.is_set() and not self.finished:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.25))
                if self._stalled():
                    break
            if self._consumed:
                frame = None
            else:
                frame, self._consumed = self._latest, True
                self._cond.notify_all()  # a paced file reader waits for this
        if frame is None and self._stalled():
            self._restart_stalled()
        return frame

    def seconds_since_progress(self) -> float:
        return max(0.0, self._clock() - self._last_progress)

    def _stalled(self) -> bool:
        return (
            self.live
            and not self._reconnecting
            and not self._stop.is_set()
            and self.seconds_since_progress() > self.cfg.stall_timeout_s
        )

    def _restart_stalled(self) -> None:
        self._log.warning("camera_stalled", seconds=round(self.seconds_since_progress(), 2))
        self._metrics.camera_reconnects.inc()
        self._spawn(None)  # the stuck thread sees a newer generation and exits when its read returns

    # ------------------------------------------------------------------ producer side

    def _current(self, gen: int) -> bool:
        return gen == self._generation and not self._stop.is_set()

    def _run(self, gen: int, source: VideoSource | None) -> None:
        delay = self.cfg.backoff_initial_s
        period = self._file_period(source) if source is not None else None
        try:
            while self._current(gen):
                if source is None:
                    source = self._reopen(gen, delay)
                    if source is None:
                        delay = min(delay * 2, self.cfg.backoff_max_s)
                        continue
                    period = self._file_period(source)
                ok, image = source.read()
                if not self._current(gen):
                    break
                if not ok or image is None:
                    source.release()
                    source = None
                    if not self._source_ended(gen):
                        break
                    continue
                delay = self.cfg.backoff_initial_s
                self._deliver(gen, image)
                if not self.live:
                    self._pace(gen, period)
        finally:
            if source is not None:
                source.release()

    def _source_ended(self, gen: int) -> bool:
        """A read failed. Returns True to reopen, False when the stream is over."""
        if not self.live:
            if self.cfg.loop:
                self._log.debug("video_file_looped")
                return True
            with self._cond:
                self.finished = True
                self._cond.notify_all()
            self._log.info("video_file_ended", frames=self._next_id)
            return False
        self._log.warning("camera_read_failed")
        self._metrics.camera_reconnects.inc()
        return True

    def _reopen(self, gen: int, delay: float) -> VideoSource | None:
        """One reopen attempt after ``delay`` (live sources). Stays 'reconnecting' until one succeeds."""
        self._reconnecting = True
        if self.live and self._stop.wait(delay):
            return None
        if not self._current(gen):
            return None
        try:
            source = self._opener(self.cfg)
        except Exception as e:  # loop boundary: any open failure means "try again later"
            self._log.warning(
                "camera_reopen_failed", error=str(e), retry_in_s=min(delay * 2, self.cfg.backoff_max_s)
            )
            if not self.live:  # a file that vanished does not come back on its own
                with self._cond:
                    self.finished = True
                    self._cond.notify_all()
            return None
        if self.live:
            self._log.info("camera_reconnected")
        with self._cond:
            self._last_progress = self._clock()
            self._reconnecting = False
        return source

    def _deliver(self, gen: int, image: np.ndarray) -> None:
        captured, wall = self._clock(), time.time()
        prepared, error, seconds = None, None, 0.0
        prepare = self.prepare
        if prepare is not None:
            try:
                prepared = prepare(image)
            except Exception as e:  # thread boundary: a bad frame must not end the grabber
                error = f"{type(e).__name__}: {e}"
            seconds = max(0.0, self._clock() - captured)
        with self._cond:
            frame = Frame(image, self._next_id, captured, wall, prepared, seconds, error, prepare)
            if gen != self._generation:
                return
            if not self._consumed:
                self._metrics.frames_dropped.inc()
            self._latest, self._consumed = frame, False
            self._next_id += 1
            self._last_progress = frame.captured_mono
            self._cond.notify_all()

    def _file_period(self, source: VideoSource) -> float | None:
        if self.live or not self.cfg.realtime:
            return None
        fps = source.get(cv2.CAP_PROP_FPS) or 0.0
        return 1.0 / fps if fps > 0 else None

    def _pace(self, gen: int, period: float | None) -> None:
        """Files: either as a camera would (realtime) or one frame per consumer request."""
        if period is not None:
            self._stop.wait(period)
            return
        with self._cond:
            while not self._consumed and self._current(gen):
                self._cond.wait(0.25)
