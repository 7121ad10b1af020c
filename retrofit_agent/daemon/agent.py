"""The frame loop: newest frame → preprocess → embed → label → regions → outputs, with metrics.

:class:`Agent` receives every component ready-made from the composition root
(:mod:`retrofit_agent.daemon.app`): it parses no configuration, owns no sockets, builds no
messages (:mod:`retrofit_agent.daemon.outputs`) and decides nothing about reloads
(:mod:`retrofit_agent.daemon.reload`). It loops.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog

from retrofit_agent.contract.messages import Health, Latency
from retrofit_agent.contract.preprocess import BadFrameError
from retrofit_agent.contract.regions import Region
from retrofit_agent.daemon.budget_cpu import Pacer
from retrofit_agent.daemon.capture import Frame, FrameGrabber
from retrofit_agent.daemon.collect.collector import Collector, FrameRecord
from retrofit_agent.daemon.labelling import LabelResult, Tag
from retrofit_agent.daemon.lifecycle import StopSignal, SystemdNotifier
from retrofit_agent.daemon.metrics import AgentMetrics
from retrofit_agent.daemon.outputs import Outputs
from retrofit_agent.daemon.pipeline import ModelPipeline
from retrofit_agent.daemon.reload import Reloaded, Reloader
from retrofit_agent.daemon.variants import record

log = structlog.get_logger("retrofit_agent.daemon.agent")


@dataclass(frozen=True)
class LoopSettings:
    """The few settings the loop itself reads."""

    status_interval_s: float = 2.0
    stall_timeout_s: float = 5.0  # past it without a fresh frame, health is 'degraded'
    max_frames: int | None = None


class FpsMeter:
    """Processed frames per second over the last ``horizon`` seconds; 0 when frames stop."""

    def __init__(self, window: int = 30, horizon: float = 5.0) -> None:
        self._times: deque[float] = deque(maxlen=window)
        self._horizon = horizon

    def tick(self, now: float) -> float:
        self._times.append(now)
        return self.rate(now)

    def rate(self, now: float) -> float:
        while self._times and now - self._times[0] > self._horizon:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else 0.0


@dataclass
class AgentIO:
    """The frame loop's collaborators, built by the composition root."""

    grabber: FrameGrabber
    outputs: Outputs
    metrics: AgentMetrics
    notifier: SystemdNotifier
    stop: StopSignal
    collector: Collector | None = None
    reloader: Reloader | None = None
    pacer: Pacer | None = None  # the CPU and thermal budgets; None: every fresh frame is inferred


class Agent:
    def __init__(
        self,
        settings: LoopSettings,
        pipeline: ModelPipeline,
        io: AgentIO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.grabber = io.grabber
        self.outputs = io.outputs
        self.metrics = io.metrics
        self.notifier = io.notifier
        self.stop = io.stop
        self.collector = io.collector
        self.reloader = io.reloader
        self.pacer = io.pacer
        self._clock = clock
        self._last_frame: Frame | None = None
        self._processed = 0
        self._fps = FpsMeter()
        self._last_fps = 0.0
        self._current_tags: list[Tag] = []
        self._last_status = float("-inf")
        self._log = log.bind(camera=io.outputs.camera, model=pipeline.model_id)

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        """Process frames until stopped, the file ends or max_frames is reached. Returns 0."""
        max_frames = self.settings.max_frames
        while not self.stop.is_set():
            waited_from = self._clock()
            if self.pacer is not None and self._wait_for_budget(waited_from):
                continue
            frame = self.grabber.get(timeout=0.25)
            now = self._clock()
            self._housekeeping(now)
            if frame is None:
                if self.grabber.finished:
                    self._log.info("source_finished", frames_processed=self._processed)
                    break
                continue
            if self.pacer is not None:
                skipped = self.pacer.admit(now)
                if skipped is not None:
                    self.metrics.budget.frames_skipped.labels(reason=skipped).inc()
                    continue
                self._process(frame, waited=now - waited_from)
                self.pacer.processed(now, self._clock())
            else:
                self._process(frame, waited=now - waited_from)
            if max_frames is not None and self._processed >= max_frames:
                self._log.info("max_frames_reached", frames_processed=self._processed)
                break
        return 0

    def _wait_for_budget(self, now: float) -> bool:
        """Wait (at most one loop turn) while no inference is due; True if it waited."""
        assert self.pacer is not None
        wait = self.pacer.wait_s(now)
        if wait <= 0:
            return False
        self.grabber.held_for = self.pacer.reason(now)
        try:
            self.stop.event.wait(min(wait, 0.25))
        finally:
            self.grabber.held_for = None
        self._housekeeping(self._clock())
        return True

    def _housekeeping(self, now: float) -> None:
        """Once per loop turn, frame or not: status, captures, reloads, liveness."""
        if now - self._last_status >= self.settings.status_interval_s:
            self._last_status = now
            self._publish_status()
        if self.collector is not None:
            for saved in self.collector.drain_saved():
                self.outputs.capture(saved, self.pipeline.model_id)
        if self.reloader is not None:
            self._reload_if_asked()
        self._last_fps = self._fps.rate(now)
        self.metrics.fps.set(self._last_fps)
        if self.pacer is not None:
            self._pace(now)
        self.metrics.seconds_since_frame.set(self.grabber.seconds_since_progress())
        # The watchdog guards the loop, not the camera: a loop that turns (waiting for a
        # camera included) is alive; a hung inference or a stuck grabber starves it.
        if self.grabber.healthy():
            self.notifier.watchdog()

    def _process(self, frame: Frame, waited: float) -> None:
        p = self.pipeline
        t0 = self._clock()
        tensor = self._model_input(frame)
        if tensor is None:
            return
        prep_seconds = (
            frame.prepared.seconds
            if frame.prepared and frame.prepared.generation == p.generation
            else self._clock() - t0
        )
        t1 = self._clock()
        try:
            embedding, cells = p.infer(tensor)
        except Exception as e:  # loop boundary: one bad inference must not end the daemon
            self.metrics.frames_failed.labels(reason="inference_error").inc()
            self._log.error("inference_failed", frame_id=frame.frame_id, error=str(e), error_type=type(e).__name__)
            return
        t2 = self._clock()
        result = p.labeler(embedding)
        t3 = self._clock()
        # On the loop thread, after labelling: only the active tags need boxes, at most K of them.
        regions = p.find_regions(cells, result, (frame.image.shape[0], frame.image.shape[1]))
        t4 = self._clock()
        latency = Latency(
            capture_wait_ms=round(waited * 1e3, 3),
            preprocess_ms=round(prep_seconds * 1e3, 3),
            inference_ms=round((t2 - t1) * 1e3, 3),
            labelling_ms=round((t3 - t2) * 1e3, 3),
            regions_ms=round((t4 - t3) * 1e3, 3) if p.regions is not None else 0.0,
            end_to_end_ms=round(max(0.0, t4 - frame.captured_mono) * 1e3, 3),
        )
        seq = self._publish(frame, result, regions, latency)
        if self.collector is not None:
            self.collector.observe(self._record(frame, result, regions, seq))
        t5 = self._clock()
        stages = {
            "capture_wait": waited,
            "preprocess": prep_seconds,
            "inference": t2 - t1,
            "labelling": t3 - t2,
            "publish": t5 - t4,
        }
        if p.regions is not None:  # a model without regions leaves the stage empty rather than at 0
            stages["regions"] = t4 - t3
        self._observe(frame, stages, max(0.0, t5 - frame.captured_mono))
        if self.grabber.healthy():
            self.notifier.watchdog()

    def _model_input(self, frame: Frame) -> np.ndarray | None:
        """The prepared tensor (made on the grabber thread by this pipeline, or now); None for a bad frame."""
        ready = frame.prepared
        if ready is not None and ready.generation == self.pipeline.generation:
            if ready.error is None and ready.tensor is not None:
                return ready.tensor
            self._bad_frame(frame, ready.error or "not prepared")
            return None
        try:
            return self.pipeline.prepare(frame.image)
        except BadFrameError as e:
            self._bad_frame(frame, str(e))
            return None

    def _reload_if_asked(self) -> None:
        assert self.reloader is not None
        if self.stop.reload.is_set():
            self.stop.reload.clear()
            self.reloader.request()
        done = self.reloader.poll()
        if done is not None:
            self._swap(done)

    def _swap(self, done: Reloaded) -> None:
        """Apply a finished reload between two frames (what it applies, reload.py decided)."""
        old_id = self.pipeline.model_id
        if done.model_changed:
            if self._last_frame is not None:  # the old model's tags end here
                for tag in self._current_tags:
                    self._event(self._last_frame, tag, on=False)
            self._current_tags = []
        self.pipeline = done.pipeline
        self.grabber.set_preparer(done.pipeline.prepare, done.pipeline.generation)
        m = done.pipeline.bundle.manifest
        self.metrics.set_model(m.model_id, m.version, m.trained, self.outputs.camera)
        if done.pipeline.choice is not None:
            record(done.pipeline.choice, self.metrics.budget)
        campaigns = done.config.collect.campaigns
        if self.collector is not None:
            self.collector.set_campaigns(campaigns)
            self.collector.set_model(m.model_id, m.version)
        self._log = log.bind(camera=self.outputs.camera, model=m.model_id)
        self._log.info(
            "reload_applied",
            previous_model=old_id,
            model_changed=done.model_changed,
            campaigns=[c.name for c in campaigns],
        )

    def _bad_frame(self, frame: Frame, error: str) -> None:
        self.metrics.frames_failed.labels(reason="bad_frame").inc()
        self._log.warning("bad_frame", frame_id=frame.frame_id, error=error)

    # ------------------------------------------------------------------ outputs

    def _publish(self, frame: Frame, result: LabelResult, regions: list[Region], latency: Latency) -> int:
        seq = self.outputs.tags(
            frame.frame_id, frame.captured_wall, self.pipeline.model_id, result, latency, regions=regions
        )
        self._last_frame = frame
        self._current_tags = result.tags
        for change in result.changes:
            self._event(frame, change.tag, change.on)
        return seq

    def _event(self, frame: Frame, tag: Tag, on: bool) -> None:
        self.outputs.event(frame.frame_id, frame.captured_wall, self.pipeline.model_id, tag, on)
        self._log.info("tag_changed", tag=tag.key, on=on, score=tag.score, frame_id=frame.frame_id)

    def _record(self, frame: Frame, result: LabelResult, regions: list[Region], seq: int) -> FrameRecord:
        return FrameRecord(
            image=frame.image,
            frame_id=frame.frame_id,
            seq=seq,
            captured_wall=frame.captured_wall,
            captured_mono=frame.captured_mono,
            tags={t.key: t.score for t in result.tags},
            top={t.group: (t.label, t.score) for t in result.tops},
            regions=tuple(regions),
        )

    def _observe(self, frame: Frame, stages: dict[str, float], end_to_end: float) -> None:
        m = self.metrics
        for name, seconds in stages.items():
            m.stage_seconds.labels(stage=name).observe(max(0.0, seconds))
        m.end_to_end_seconds.observe(end_to_end)
        m.frames_processed.inc()
        m.last_frame_timestamp.set(frame.captured_wall)
        self._last_fps = self._fps.tick(self._clock())
        m.fps.set(self._last_fps)
        self._processed += 1

    def _pace(self, now: float) -> None:
        p, m = self.pacer, self.metrics.budget
        assert p is not None
        p.tick(now)
        m.rate_limit_fps.set(p.rate_limit_fps())
        m.cpu_cores.set(p.cpu_cores())
        if p.thermal is not None:
            m.set_thermal(p.thermal.state)
            if p.thermal.celsius is not None:
                m.thermal_celsius.set(p.thermal.celsius)

    def _health(self) -> Health:
        g = self.grabber
        if not g.delivered:
            return "waiting_for_camera"
        if not g.connected or g.seconds_since_progress() > self.settings.stall_timeout_s:
            return "degraded"
        return "ok"

    def _publish_status(self) -> None:
        m = self.pipeline.bundle.manifest
        running = self.pipeline.running
        thermal = self.pacer.thermal if self.pacer is not None else None
        self.outputs.status(
            self.pipeline.model_id,
            m.trained,
            self._health(),
            self._processed,
            self._last_fps,
            self._current_tags,
            variant=None if running is None else running.label,
            thermal=None if thermal is None else thermal.state,
        )
