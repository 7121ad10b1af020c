"""Time for frames: when a live frame was produced (and whether it is stale), and when a
file's frame is due when played like a camera.

:class:`StreamClock` dates live frames by the stream's own timestamps, so a frame's
capture time is when the source produced it, never when a stale buffer was re-read;
:class:`FilePacer` plays a file at its own timestamps against one deadline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
import structlog

from retrofit_agent.daemon.sources import VideoSource

log = structlog.get_logger("retrofit_agent.daemon.capture")


def stream_seconds(source: VideoSource) -> float | None:
    """The last read frame's presentation time in the stream's own timeline, if it has one."""
    try:
        ms = float(source.get(cv2.CAP_PROP_POS_MSEC))
    except Exception:  # a source without the property
        return None
    return ms / 1000.0 if math.isfinite(ms) and ms > 0 else None


def fit_within(image: np.ndarray, max_width: int, max_height: int) -> np.ndarray | None:
    """``image`` downscaled (aspect kept) to fit ``max_width`` x ``max_height``; None if it fits."""
    h, w = image.shape[:2]
    if not (h and w):
        return None  # an empty frame: the preparer rejects it
    scale = min(max_width / w, max_height / h)
    if scale >= 1.0:
        return None
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class StreamClock:
    """Maps a live source's timestamps onto the monotonic clock and spots stale frames.

    ``base`` is the smallest (arrival - presentation time) offset seen on this connection:
    the fastest path from the source to us. A frame's lag is how much later than that it
    arrived. A frozen stream's buffer comes out late (after a read timeout) or repeated
    (the same timestamp again); both are stale. ``base`` may drift up slowly, so a camera
    whose clock runs a little slow is not declared late after hours.

    Some sources have no real timestamps: a raw MJPEG pipe or HTTP stream gets ones that
    FFmpeg makes up at a nominal 25 fps, whatever the camera's rate. So the timestamps are
    trusted only if, frame to frame, they advance with the wall clock (the median ratio over
    a connection's first ``TRUST_PAIRS`` frames; a median, so one freeze or burst does not
    decide it). Without (trusted) timestamps, a frame identical to the previous one (no
    sensor noise at all) is a re-delivery.
    """

    DRIFT = 1e-3  # s/s of clock skew tolerated between the source and us
    DISCONTINUITY_S = 1.0  # a timeline jumping back further than this restarted: re-anchor
    TRUST_PAIRS = 15
    RATE_TOLERANCE = 0.15

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.reset()

    def reset(self) -> None:
        self._base: float | None = None
        self._last_pts: float | None = None
        self._last_now = 0.0
        self._last_print: bytes | None = None
        self._ratios: list[float] = []
        self.trusted: bool | None = None  # None: not decided yet on this connection

    def observe(self, pts: float | None, now: float, image: np.ndarray) -> float | None:
        """The monotonic time ``image`` was produced, or None when it is stale."""
        if pts is not None and self.trusted is None:
            self._judge(pts, now)
        if pts is None or self.trusted is False:
            fingerprint = np.ascontiguousarray(image[::16, ::16]).tobytes()
            repeated = fingerprint == self._last_print
            self._last_print = fingerprint
            return None if repeated else now
        if self._last_pts is not None and pts <= self._last_pts:
            if self._last_pts - pts < self.DISCONTINUITY_S:
                return None  # the same frame, or one from before it: a re-delivery
            self._base = None  # the source restarted its timeline
        offset = now - pts
        if self._base is None:
            self._base = offset
        else:
            self._base = min(self._base + self.DRIFT * max(0.0, now - self._last_now), offset)
        self._last_pts, self._last_now = pts, now
        if offset - self._base > self.max_age_s:
            return None
        return min(now, self._base + pts)

    def _judge(self, pts: float, now: float) -> None:
        if self._last_pts is not None and now - self._last_now > 0.005 and pts > self._last_pts:
            self._ratios.append((pts - self._last_pts) / (now - self._last_now))
        if len(self._ratios) >= self.TRUST_PAIRS:
            rate = float(np.median(self._ratios))
            self.trusted = abs(rate - 1.0) <= self.RATE_TOLERANCE
            if not self.trusted:
                log.info(
                    "stream_timestamps_ignored",
                    rate=round(rate, 3),
                    reason="they do not advance with the wall clock (made up by the demuxer?)",
                )


class FilePacer:
    """Paces a file like a camera: each frame at its own timestamp against one deadline.

    Deadlines are anchored once per pass through the file, so sleeping late never adds up
    (no drift), and variable frame rates follow the file's timestamps. Without timestamps
    the container's nominal rate is used.
    """

    def __init__(self, nominal_fps: float, clock: Callable[[], float]) -> None:
        self._period = 1.0 / nominal_fps if nominal_fps > 0 else 0.0
        self._clock = clock
        self._anchor: float | None = None
        self._first_pts = 0.0
        self._count = 0

    def deadline(self, pts: float | None) -> float:
        now = self._clock()
        if self._anchor is None:
            self._anchor, self._first_pts = now, pts if pts is not None else 0.0
        offset = (pts - self._first_pts) if pts is not None else self._count * self._period
        self._count += 1
        return self._anchor + max(0.0, offset)
