"""Frame sources through OpenCV, and the grabber thread that keeps only the newest frame.

Waiting for a camera is a state, not a failure: a live source (V4L2, network stream,
GStreamer) that is absent, refused or frozen, at start-up or later, is opened again with
exponential back-off for as long as the daemon runs. Only what waiting cannot fix fails
start-up: a video file that does not exist, or a GStreamer pipeline on an OpenCV build
without GStreamer. Every open happens on the grabber thread, so a stop never waits for a
hanging open. A stalled read may hang inside native code, so a stall abandons the stuck
thread (it exits when its read returns) and starts a fresh one rather than waiting for it.

A frame's capture time is when the source produced it, taken from the stream's own
timestamps (:class:`StreamClock`), never when a stale buffer was re-read: frames a frozen
stream re-delivers, or delivers long after they were produced, are dropped and counted,
and do not count as progress, so a frozen stream is a stall.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import structlog

from retrofit_agent.daemon.config import CameraConfig
from retrofit_agent.daemon.frame_time import FilePacer, StreamClock, fit_within, stream_seconds
from retrofit_agent.daemon.metrics import AgentMetrics
from retrofit_agent.daemon.sources import VideoSource, camera_id, check_source, open_source, resolve_kind

log = structlog.get_logger("retrofit_agent.daemon.capture")

# A grabber whose stuck reads have left this many threads behind is itself stuck: it stops
# reporting healthy, so the watchdog restarts the process instead of leaking threads.
MAX_ABANDONED_THREADS = 8


@dataclass(frozen=True)
class Prepared:
    """What the grabber's preparer made of a frame: the model input, or why it could not."""

    tensor: np.ndarray | None
    seconds: float
    error: str | None
    generation: int  # the model pipeline that prepared it; a reload bumps it


@dataclass(frozen=True)
class Frame:
    image: np.ndarray
    frame_id: int
    captured_mono: float  # time.monotonic() when the source produced the frame
    captured_wall: float  # the same moment as Unix time, for messages only
    prepared: Prepared | None = None


Preparer = Callable[[np.ndarray], np.ndarray]


class FrameGrabber:
    """Reads frames on a background thread and hands the frame loop the newest one.

    ``get()`` is the frame loop's only entry point: it waits for a frame newer than the
    last one returned, and is also where stalls are detected (the frame loop is the one
    thread that is never stuck in a camera driver).

    The preparer (the model's preprocessing) runs on the grabber thread, so decoding and
    resizing the next frame overlap with inference on the current one.
    """

    def __init__(
        self,
        cfg: CameraConfig,
        metrics: AgentMetrics,
        opener: Callable[[CameraConfig], VideoSource] = open_source,
        clock: Callable[[], float] = time.monotonic,
        admit: Callable[[int, int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self._admit = admit  # checks a source's frame size (the memory budget); raises to refuse it
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
        self._prepare: Preparer | None = None
        self._prepare_generation = 0
        self._last_progress = clock()
        self.finished = False  # a non-looping file reached its end
        self.connected = False  # a source is open now
        self.delivered = False  # at least one frame has arrived since start-up
        self._reconnecting = False  # back-off waits are not stalls
        # Set by the loop while it waits for the CPU/thermal budget ("budget" or "thermal"):
        # frames replaced meanwhile are skipped by choice, counted apart from busy drops.
        self.held_for: str | None = None
        self._threads: list[threading.Thread] = []
        self._log = log.bind(camera=camera_id(cfg))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Refuse what waiting cannot fix, then open and grab on the grabber thread.

        A file is opened here, so an unreadable one fails start-up; a live source is opened
        by the thread, so a camera that is not there yet is waited for.
        """
        check_source(self.cfg)
        source = None if self.live else self._open()
        if source is not None:
            self._set_connected(True)
        self._spawn(source)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop grabbing; waits at most ``timeout`` for threads (a hanging open is left behind)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = self._clock() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - self._clock()))

    def set_preparer(self, prepare: Preparer, generation: int) -> None:
        """Prepare frames on the grabber thread with ``prepare`` (set again on a reload).

        Frames carry ``generation``, so the loop redoes those prepared by an older pipeline.
        """
        self._prepare, self._prepare_generation = prepare, generation

    def healthy(self) -> bool:
        """False when the grabber itself is stuck or dead (not when the camera is away)."""
        if self._stop.is_set() or self.finished:
            return True
        alive = [t for t in self._threads if t.is_alive()]
        current = any(t.name == f"grabber-{self._generation}" for t in alive)
        return current and len(alive) <= MAX_ABANDONED_THREADS

    def _spawn(self, source: VideoSource | None) -> None:
        with self._cond:
            self._generation += 1
            gen = self._generation
            self._last_progress = self._clock()
        t = threading.Thread(target=self._run, args=(gen, source), name=f"grabber-{gen}", daemon=True)
        self._threads = [th for th in self._threads if th.is_alive()] + [t]
        t.start()

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._metrics.camera_connected.set(1 if connected else 0)

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
                self._cond.notify_all()  # a file reader waiting for its consumer goes on
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
        self._set_connected(False)
        self._spawn(None)  # the stuck thread sees a newer generation and exits when its read returns

    # ------------------------------------------------------------------ producer side

    def _current(self, gen: int) -> bool:
        return gen == self._generation and not self._stop.is_set()

    def _run(self, gen: int, source: VideoSource | None) -> None:
        try:
            self._grab(gen, source)
        except Exception as e:  # thread boundary: log it; healthy() turns False and the watchdog acts
            self._log.error("grabber_failed", error=str(e), error_type=type(e).__name__)
            if not self.live:
                with self._cond:
                    self.finished = True
                    self._cond.notify_all()

    def _grab(self, gen: int, source: VideoSource | None) -> None:
        delay = 0.0 if source is None and not self.delivered else self.cfg.backoff_initial_s
        clock = StreamClock(self.cfg.frame_age_limit_s)
        pacer = self._pacer(source)
        failures = 0
        try:
            while self._current(gen):
                if source is None:
                    source = self._reopen(gen, delay)
                    delay = min(max(delay * 2, self.cfg.backoff_initial_s), self.cfg.backoff_max_s)
                    if source is None:
                        continue
                    clock.reset()
                    pacer = self._pacer(source)
                ok, image = source.read()
                if not self._current(gen):
                    break
                if not ok or image is None:
                    failures += 1
                    if not self.live and failures < self.cfg.max_read_failures:
                        continue  # a damaged stretch of a file: skip ahead
                    source.release()
                    source = None
                    self._set_connected(False)
                    if not self._source_ended(gen):
                        break
                    continue
                if failures and not self.live:
                    self._metrics.frames_failed.labels(reason="read_error").inc(failures)
                    self._log.warning("video_file_frames_unreadable", skipped=failures)
                failures = 0
                delay = self.cfg.backoff_initial_s
                pts = stream_seconds(source)
                if pacer is not None:
                    produced = pacer.deadline(pts)
                    self._stop.wait(max(0.0, produced - self._clock()))
                elif self.live:
                    fresh = clock.observe(pts, self._clock(), image)
                    if fresh is None:
                        self._metrics.frames_stale.inc()
                        continue
                    produced = fresh
                else:
                    produced = self._clock()
                self._deliver(gen, image, produced)
                if not self.live and pacer is None:
                    self._wait_for_consumer(gen)
        finally:
            if source is not None:
                source.release()

    def _pacer(self, source: VideoSource | None) -> FilePacer | None:
        if self.live or not self.cfg.realtime or source is None:
            return None
        return FilePacer(source.get(cv2.CAP_PROP_FPS) or 0.0, self._clock)

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
        """One open attempt after ``delay``. Stays 'reconnecting' until one succeeds."""
        self._reconnecting = True
        if self.live and delay > 0 and self._stop.wait(delay):
            return None
        if not self._current(gen):
            return None
        try:
            source = self._open()
        except Exception as e:  # loop boundary: any open failure means "try again later"
            retry = min(max(delay * 2, self.cfg.backoff_initial_s), self.cfg.backoff_max_s)
            event = "camera_reopen_failed" if self.delivered else "camera_waiting"
            self._log.warning(event, error=str(e), retry_in_s=round(retry, 2))
            if not self.live:  # a file that vanished does not come back on its own
                with self._cond:
                    self.finished = True
                    self._cond.notify_all()
            return None
        if not self._current(gen):  # stopped or superseded while the open hung
            source.release()
            return None
        if self.live:
            self._log.info("camera_connected" if not self.delivered else "camera_reconnected")
        with self._cond:
            self._last_progress = self._clock()
            self._reconnecting = False
        self._set_connected(True)
        return source

    def _open(self) -> VideoSource:
        source = self._opener(self.cfg)
        if self._admit is not None:
            width, height = int(source.get(cv2.CAP_PROP_FRAME_WIDTH)), int(source.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if width > 0 and height > 0:
                try:
                    self._admit(width, height)
                except Exception:
                    source.release()
                    raise
        return source

    def _deliver(self, gen: int, image: np.ndarray, produced: float) -> None:
        now, wall = self._clock(), time.time()
        smaller = fit_within(image, self.cfg.max_frame_width, self.cfg.max_frame_height)
        if smaller is not None:
            image = smaller
            self._metrics.frames_downscaled.inc()
        prepared = None
        prepare, generation = self._prepare, self._prepare_generation
        if prepare is not None:
            t0 = self._clock()
            try:
                prepared = Prepared(prepare(image), 0.0, None, generation)
            except Exception as e:  # thread boundary: a bad frame must not end the grabber
                prepared = Prepared(None, 0.0, f"{type(e).__name__}: {e}", generation)
            prepared = Prepared(prepared.tensor, max(0.0, self._clock() - t0), prepared.error, generation)
        with self._cond:
            if gen != self._generation:
                return
            frame = Frame(image, self._next_id, produced, wall - (now - produced), prepared)
            if not self._consumed:
                if self.held_for is not None:  # the loop chose to wait (a budget), not too busy
                    self._metrics.budget.frames_skipped.labels(reason=self.held_for).inc()
                else:
                    self._metrics.frames_dropped.inc()
            self._latest, self._consumed = frame, False
            self._next_id += 1
            self._last_progress = max(self._last_progress, produced)
            self.delivered = True
            self._cond.notify_all()

    def _wait_for_consumer(self, gen: int) -> None:
        """Files without pacing: one frame per consumer request, none dropped."""
        with self._cond:
            while not self._consumed and self._current(gen):
                self._cond.wait(0.25)
