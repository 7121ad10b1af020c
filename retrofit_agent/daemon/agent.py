"""The frame loop: newest frame → preprocess → embed → label → publish, with metrics.

:class:`Agent` receives every component ready-made from the composition root
(:mod:`retrofit_agent.daemon.cli`); it owns no configuration parsing and no sockets of its own.
"""

from __future__ import annotations

import platform
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import structlog

from retrofit_agent.daemon.capture import Frame, FrameGrabber
from retrofit_agent.daemon.config import AgentConfig
from retrofit_agent.daemon.labelling import LabelResult, Tag
from retrofit_agent.daemon.lifecycle import StopSignal, SystemdNotifier
from retrofit_agent.daemon.metrics import AgentMetrics
from retrofit_agent.contract.preprocess import BadFrameError
from retrofit_agent.daemon.pipeline import ModelPipeline
from retrofit_agent.daemon.publish import Publisher
from retrofit_agent.daemon.reload import Reloader
from retrofit_agent.daemon.collect.collector import Collector, FrameRecord
from retrofit_agent.contract.messages import (
    TOPIC_CAPTURES, TOPIC_EVENTS, TOPIC_STATUS, TOPIC_TAGS, CaptureMessage, EventMessage, Latency, StatusMessage,
    TagOut, TagsMessage,
)

log = structlog.get_logger("retrofit_agent.daemon.agent")


def utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _tags_out(tags: list[Tag]) -> list[TagOut]:
    return [TagOut(group=t.group, label=t.label, score=t.score) for t in tags]


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
    publisher: Publisher
    metrics: AgentMetrics
    notifier: SystemdNotifier
    stop: StopSignal
    collector: Collector | None = None
    reloader: Reloader | None = None


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        pipeline: ModelPipeline,
        io: AgentIO,
        camera: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.grabber = io.grabber
        self.publisher = io.publisher
        self.metrics = io.metrics
        self.notifier = io.notifier
        self.stop = io.stop
        self.collector = io.collector
        self.reloader = io.reloader
        self._last_frame: Frame | None = None
        self.camera = camera
        self._clock = clock
        self._seq = 0
        self._event_seq = 0
        self._capture_seq = 0
        self._processed = 0
        self._fps = FpsMeter()
        self._last_fps = 0.0
        self._current_tags: list[Tag] = []
        self._last_status = float("-inf")
        self._log = log.bind(camera=camera, model=pipeline.model_id)

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        """Process frames until stopped, the file ends or max_frames is reached. Returns 0."""
        max_frames = self.cfg.max_frames
        while not self.stop.is_set():
            waited_from = self._clock()
            frame = self.grabber.get(timeout=0.25)
            now = self._clock()
            self._housekeeping(now)
            if frame is None:
                if self.grabber.finished:
                    self._log.info("source_finished", frames_processed=self._processed)
                    break
                continue
            self._process(frame, waited=now - waited_from)
            if max_frames is not None and self._processed >= max_frames:
                self._log.info("max_frames_reached", frames_processed=self._processed)
                break
        return 0

    def _housekeeping(self, now: float) -> None:
        """Once per loop turn, frame or not: status, captures, reloads, liveness."""
        if now - self._last_status >= self.cfg.publish.status_interval_s:
            self._publish_status(now)
        if self.collector is not None:
            self._publish_captures()
        if self.reloader is not None:
            self._reload_if_asked()
        self._last_fps = self._fps.rate(now)
        self.metrics.fps.set(self._last_fps)
        self.metrics.seconds_since_frame.set(self.grabber.seconds_since_progress())
        # The watchdog guards the loop, not the camera: a loop that turns (waiting for a
        # camera included) is alive; a hung inference or a stuck grabber starves it.
        if self.grabber.healthy():
            self.notifier.watchdog()

    def _process(self, frame: Frame, waited: float) -> None:
        p = self.pipeline
        t0 = self._clock()
        ready = frame.prepared
        if ready is not None and ready.generation == p.generation:  # done on the grabber thread
            if ready.error is not None or ready.tensor is None:
                self._bad_frame(frame, ready.error or "not prepared")
                return
            tensor, prep_seconds = ready.tensor, ready.seconds
        else:
            try:
                tensor = p.prepare(frame.image)
            except BadFrameError as e:
                self._bad_frame(frame, str(e))
                return
            prep_seconds = self._clock() - t0
        t1 = self._clock()
        try:
            embedding = p.embedder.embed(tensor)
        except Exception as e:  # loop boundary: one bad inference must not end the daemon
            self.metrics.frames_failed.labels(reason="inference_error").inc()
            self._log.error("inference_failed", frame_id=frame.frame_id, error=str(e), error_type=type(e).__name__)
            return
        t2 = self._clock()
        result = p.labeler(embedding)
        t3 = self._clock()
        latency = Latency(
            capture_wait_ms=round(waited * 1e3, 3),
            preprocess_ms=round(prep_seconds * 1e3, 3),
            inference_ms=round((t2 - t1) * 1e3, 3),
            labelling_ms=round((t3 - t2) * 1e3, 3),
            end_to_end_ms=round(max(0.0, t3 - frame.captured_mono) * 1e3, 3),
        )
        self._publish(frame, result, latency)
        self._last_frame = frame
        if self.collector is not None:
            self.collector.observe(self._record(frame, result))
        t4 = self._clock()
        self._observe(frame, (waited, prep_seconds, t2 - t1, t3 - t2, t4 - t3), max(0.0, t4 - frame.captured_mono))
        if self.grabber.healthy():
            self.notifier.watchdog()

    def _reload_if_asked(self) -> None:
        if self.stop.reload.is_set():
            self.stop.reload.clear()
            self.reloader.request(self.cfg)
        done = self.reloader.poll()
        if done is not None:
            self._swap(done.config, done.pipeline)

    def _swap(self, cfg: AgentConfig, pipeline: ModelPipeline) -> None:
        """Switch to a verified, warmed-up pipeline between two frames.

        A reload that changes neither the bundle nor the labelling keeps the running
        pipeline, so its tags (and their smoothing) carry on instead of going off and on.
        """
        old_id = self.pipeline.model_id
        unchanged = pipeline.bundle.manifest == self.pipeline.bundle.manifest and cfg.labels == self.cfg.labels
        if unchanged:
            pipeline = self.pipeline
        else:
            if self._last_frame is not None:  # the old model's tags end here
                for tag in self._current_tags:
                    self._send_event(self._last_frame, tag, on=False)
            self._current_tags = []
        self.cfg, self.pipeline = cfg, pipeline
        self.grabber.set_preparer(pipeline.prepare, pipeline.generation)
        m = pipeline.bundle.manifest
        self.metrics.set_model(m.model_id, m.version, m.trained, self.camera)
        if self.collector is not None:
            self.collector.set_campaigns(cfg.collect.campaigns)
            self.collector.set_model(m.model_id, m.version)
        elif cfg.collect.campaigns:
            self._log.warning("reload_ignored_settings", sections=["collect.campaigns"],
                              hint="collection starts only with campaigns configured at start-up; restart")
        self._log = log.bind(camera=self.camera, model=m.model_id)
        self._log.info(
            "reload_applied", previous_model=old_id, model_changed=not unchanged,
            campaigns=[c.name for c in cfg.collect.campaigns],
        )

    def _bad_frame(self, frame: Frame, error: str) -> None:
        self.metrics.frames_failed.labels(reason="bad_frame").inc()
        self._log.warning("bad_frame", frame_id=frame.frame_id, error=error)

    # ------------------------------------------------------------------ outputs

    def _publish(self, frame: Frame, result: LabelResult, latency: Latency) -> None:
        at = utc_iso(frame.captured_wall)
        model = self.pipeline.model_id
        msg = TagsMessage(
            seq=self._seq, frame_id=frame.frame_id, camera=self.camera, captured_at=at, model=model,
            tags=_tags_out(result.tags), top=_tags_out(result.tops), latency=latency,
        )
        self._seq += 1
        self.publisher.send(TOPIC_TAGS, msg)
        self._current_tags = result.tags
        for change in result.changes:
            self._send_event(frame, change.tag, change.on)

    def _send_event(self, frame: Frame, tag: Tag, on: bool) -> None:
        event = EventMessage(
            seq=self._event_seq, frame_id=frame.frame_id, camera=self.camera, at=utc_iso(frame.captured_wall),
            model=self.pipeline.model_id, event="tag_on" if on else "tag_off", tag=_tags_out([tag])[0],
        )
        self._event_seq += 1
        self.publisher.send(TOPIC_EVENTS, event)
        self._log.info("tag_changed", tag=tag.key, on=on, score=tag.score, frame_id=frame.frame_id)

    def _record(self, frame: Frame, result: LabelResult) -> FrameRecord:
        return FrameRecord(
            image=frame.image, frame_id=frame.frame_id, seq=self._seq - 1, captured_wall=frame.captured_wall,
            captured_mono=frame.captured_mono, tags={t.key: t.score for t in result.tags},
            top={t.group: (t.label, t.score) for t in result.tops},
        )

    def _publish_captures(self) -> None:
        for saved in self.collector.drain_saved():
            job, item = saved.job, saved.item
            msg = CaptureMessage(
                seq=self._capture_seq, campaign=job.campaign.name, path=str(item.image.resolve()),
                sidecar=str(item.sidecar.resolve()), bytes=item.bytes, role=job.role, offset=job.offset,
                frame_id=job.record.frame_id, camera=self.camera, captured_at=utc_iso(job.record.captured_wall),
                model=self.pipeline.model_id,
            )
            self._capture_seq += 1
            self.publisher.send(TOPIC_CAPTURES, msg)

    def _observe(self, frame: Frame, stages: tuple[float, ...], end_to_end: float) -> None:
        m = self.metrics
        for name, seconds in zip(("capture_wait", "preprocess", "inference", "labelling", "publish"), stages):
            m.stage_seconds.labels(stage=name).observe(max(0.0, seconds))
        m.end_to_end_seconds.observe(end_to_end)
        m.frames_processed.inc()
        m.last_frame_timestamp.set(frame.captured_wall)
        self._last_fps = self._fps.tick(self._clock())
        m.fps.set(self._last_fps)
        self._processed += 1

    def _health(self) -> str:
        g = self.grabber
        if not g.delivered:
            return "waiting_for_camera"
        if not g.connected or g.seconds_since_progress() > self.cfg.camera.stall_timeout_s:
            return "degraded"
        return "ok"

    def _publish_status(self, now: float) -> None:
        self._last_status = now
        bundle = self.pipeline.bundle
        msg = StatusMessage(
            at=utc_iso(time.time()), camera=self.camera, model=self.pipeline.model_id,
            trained=bundle.manifest.trained, health=self._health(), machine=platform.machine(),
            frames_processed=self._processed, fps=round(self._last_fps, 2),
            tags=_tags_out(self._current_tags),
        )
        self.publisher.send(TOPIC_STATUS, msg)
