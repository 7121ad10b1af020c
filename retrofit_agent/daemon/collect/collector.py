"""Runs campaigns over labelled frames and hands captures to a writer thread.

The frame loop calls :meth:`Collector.observe` once per processed frame (cheap: rule
checks and a ring-buffer append) and :meth:`Collector.drain_saved` to publish what the
writer finished. JPEG encoding, fsync and eviction happen on the writer thread, so a slow
or full disk never stalls labelling.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import cv2
import numpy as np
import structlog

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.messages import utc_iso
from retrofit_agent.contract.regions import Region
from retrofit_agent.daemon.collect.campaigns import CampaignState, Decision
from retrofit_agent.daemon.collect.store import CaptureStore, DiskFullError, StoredItem
from retrofit_agent.daemon.config import CampaignConfig, CollectConfig
from retrofit_agent.daemon.metrics import AgentMetrics

log = structlog.get_logger("retrofit_agent.daemon.collect")
SIDECAR_SCHEMA_VERSION = 1


Encoding = tuple[int, int | None]  # (JPEG quality, max width): how a campaign saves frames


@dataclass(frozen=True)
class Encoded:
    jpeg: bytes
    width: int
    height: int


def encode(image: np.ndarray, how: Encoding) -> Encoded:
    """A frame as a campaign saves it: downscaled to its max width, JPEG at its quality."""
    quality, max_width = how
    if max_width and image.shape[1] > max_width:
        h = max(1, round(image.shape[0] * max_width / image.shape[1]))
        image = cv2.resize(image, (max_width, h), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return Encoded(buf.tobytes(), int(image.shape[1]), int(image.shape[0]))


@dataclass(frozen=True)
class FrameRecord:
    """A processed frame as the collector sees it.

    In the pre-trigger ring the raw ``image`` is dropped and only ``encoded`` (JPEG, as each
    pre-trigger campaign saves it) is kept, so the ring's memory is bounded in bytes: 30
    raw 4K frames would be 750 MB, 30 JPEGs a few MB.
    """

    image: np.ndarray | None
    frame_id: int
    seq: int  # seq of its tags message
    captured_wall: float
    captured_mono: float
    tags: dict[str, float]  # tags that are on → score
    top: dict[str, tuple[str, float]]  # group → (best label, score)
    regions: tuple[Region, ...] = ()  # boxes of the active tags of localized labels
    encoded: dict[Encoding, Encoded] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        raw = self.image.nbytes if self.image is not None else 0
        return raw + sum(len(e.jpeg) for e in self.encoded.values())


@dataclass(frozen=True)
class CaptureJob:
    campaign: CampaignConfig
    record: FrameRecord
    role: str  # before | trigger | after
    offset: int  # frames relative to the trigger


@dataclass(frozen=True)
class SavedCapture:
    job: CaptureJob
    item: StoredItem


@dataclass
class _Pending:
    campaign: CampaignConfig
    remaining: int
    offset: int = 0


@dataclass
class _CampaignRun:
    state: CampaignState
    last_saved_frame: int = -1
    pending: list[_Pending] = field(default_factory=list)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "-", text).strip("-") or "camera"


def check_campaign_tags(cfg: CollectConfig, known: set[str]) -> None:
    for c in cfg.campaigns:
        unknown = sorted(c.rule.keys - known)
        if unknown:
            raise ConfigError(
                f"config error: collect.campaigns ({c.name}): unknown tag {unknown[0]!r}; "
                "tags are 'group.label' from the bundle's manifest"
            )


def check_campaign_regions(cfg: CollectConfig, localized: tuple[str, ...], unavailable: str | None) -> None:
    """A region rule on a label that gets no regions would never fire: refused like an unknown tag.

    ``localized`` are the labels that get regions; ``unavailable`` says why none do (or None).
    """
    for c in cfg.campaigns:
        region = c.rule.region
        if region is None:
            continue
        if unavailable is not None:
            raise ConfigError(
                f"config error: collect.campaigns ({c.name}): rule.region needs regions, but {unavailable}"
            )
        if region.label not in localized:
            raise ConfigError(
                f"config error: collect.campaigns ({c.name}): rule.region.label {region.label!r} gets no regions; "
                f"localized labels: {', '.join(localized)} (mark it localize in the prompts file or list it in "
                "regions.labels)"
            )


class Collector:
    def __init__(
        self,
        cfg: CollectConfig,
        metrics: AgentMetrics,
        camera: str,
        model: tuple[str, str],  # (model id, bundle version)
        clock: Callable[[], float] = time.monotonic,
        store: CaptureStore | None = None,
    ) -> None:
        self.cfg = cfg
        self._metrics = metrics
        self._camera = camera
        self._camera_safe = _safe(camera)
        self.model_id, self.model_version = model
        self._clock = clock
        self.store = store or CaptureStore(cfg.store.directory, cfg.store.max_bytes, cfg.store.max_files)
        self._runs: dict[str, _CampaignRun] = {}
        self._ring: deque[FrameRecord] = deque(maxlen=1)
        self._ring_encodings: set[Encoding] = set()
        self._jobs: queue.Queue[CaptureJob | None] = queue.Queue(maxsize=cfg.store.queue_size)
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._saved: queue.SimpleQueue[SavedCapture] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.disk_full = False
        self.set_campaigns(cfg.campaigns)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        removed = self.store.open()
        if any(removed.values()):
            log.warning("store_recovered", directory=str(self.store.directory), **removed)
        self._update_gauges()
        log.info(
            "store_opened",
            directory=str(self.store.directory),
            files=self.store.files,
            bytes=self.store.bytes,
            campaigns=[c for c in self._runs],
        )
        self._thread = threading.Thread(target=self._writer, name="capture-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Finish the queued writes for at most ``timeout`` seconds, then stop."""
        self._stop.set()
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)

    def set_campaigns(self, campaigns: list[CampaignConfig]) -> None:
        """(Re)configure campaigns between frames; a campaign that stays keeps its rate-limit state."""
        old = self._runs
        self._runs = {}
        for c in campaigns:
            run = old.get(c.name) or _CampaignRun(CampaignState(c))
            run.state.cfg = c
            self._runs[c.name] = run
            for reason in ("rate_limited", "queue_full", "disk_full", "write_error"):
                self._metrics.captures_skipped.labels(campaign=c.name, reason=reason)
            self._metrics.captures_saved.labels(campaign=c.name)
            self._metrics.captures_evicted.labels(campaign=c.name)
        depth = max([c.frames_before for c in campaigns], default=0)
        self._ring = deque(self._ring, maxlen=max(depth, 1))
        self._ring_encodings = {(c.jpeg_quality, c.max_width) for c in campaigns if c.frames_before}

    def set_model(self, model_id: str, version: str) -> None:
        self.model_id, self.model_version = model_id, version

    # ------------------------------------------------------------------ frame loop side

    def observe(self, record: FrameRecord) -> None:
        for name, run in self._runs.items():
            self._continue_pending(run, record)
            decision = run.state.update(record.tags, record.captured_mono, record.regions)
            if decision is Decision.TRIGGER:
                self._trigger(run, record)
            elif decision is Decision.RATE_LIMITED:
                self._metrics.captures_skipped.labels(campaign=name, reason="rate_limited").inc()
        if self._ring_encodings:
            self._remember(record)

    def _remember(self, record: FrameRecord) -> None:
        """Keep the frame for later triggers, encoded, in a ring bounded in frames and bytes."""
        encoded = {how: encode(record.image, how) for how in self._ring_encodings if record.image is not None}
        self._ring.append(replace(record, image=None, encoded=encoded))
        total = sum(r.nbytes for r in self._ring)
        while len(self._ring) > 1 and total > self.cfg.store.ring_max_bytes:
            total -= self._ring.popleft().nbytes

    def drain_saved(self) -> list[SavedCapture]:
        out = []
        while True:
            try:
                out.append(self._saved.get_nowait())
            except queue.Empty:
                return out

    def _trigger(self, run: _CampaignRun, record: FrameRecord) -> None:
        c = run.state.cfg
        log.info("campaign_triggered", campaign=c.name, frame_id=record.frame_id, tags=sorted(record.tags))
        before = list(self._ring)[-c.frames_before :] if c.frames_before else []
        for i, earlier in enumerate(before):
            self._enqueue(run, CaptureJob(c, earlier, "before", i - len(before)))
        self._enqueue(run, CaptureJob(c, record, "trigger", 0))
        if c.frames_after:
            run.pending.append(_Pending(c, c.frames_after))

    def _continue_pending(self, run: _CampaignRun, record: FrameRecord) -> None:
        for p in run.pending:
            p.offset += 1
            p.remaining -= 1
            self._enqueue(run, CaptureJob(p.campaign, record, "after", p.offset))
        run.pending = [p for p in run.pending if p.remaining > 0]

    def _enqueue(self, run: _CampaignRun, job: CaptureJob) -> None:
        if job.record.frame_id <= run.last_saved_frame:
            return  # already kept for this campaign (overlapping windows)
        run.last_saved_frame = job.record.frame_id
        size = job.record.nbytes
        with self._queued_lock:
            full = self._queued_bytes + size > self.cfg.store.queue_max_bytes
            if not full:
                try:
                    self._jobs.put_nowait(job)
                    self._queued_bytes += size
                except queue.Full:
                    full = True
        if full:
            self._metrics.captures_skipped.labels(campaign=job.campaign.name, reason="queue_full").inc()

    # ------------------------------------------------------------------ writer thread

    def _writer(self) -> None:
        retry_at = 0.0
        rescan_at = self._clock() + self.cfg.store.rescan_interval_s
        while True:
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                job = None
                if self._stop.is_set():
                    return
            now = self._clock()
            if now >= rescan_at:
                self.store.rescan()
                self._update_gauges()
                rescan_at = now + self.cfg.store.rescan_interval_s
            if job is None:
                if self._stop.is_set():
                    return
                continue
            with self._queued_lock:
                self._queued_bytes -= job.record.nbytes
            if self.disk_full and now < retry_at:
                self._metrics.captures_skipped.labels(campaign=job.campaign.name, reason="disk_full").inc()
                continue
            try:
                self._save(job)
            except DiskFullError:
                self._metrics.captures_skipped.labels(campaign=job.campaign.name, reason="disk_full").inc()
                if not self.disk_full:
                    log.error(
                        "store_disk_full", directory=str(self.store.directory), retry_s=self.cfg.store.disk_full_retry_s
                    )
                self.disk_full = True
                retry_at = now + self.cfg.store.disk_full_retry_s
            except Exception as e:  # thread boundary: keep the writer alive, count and log
                self._metrics.captures_skipped.labels(campaign=job.campaign.name, reason="write_error").inc()
                log.error("capture_write_failed", campaign=job.campaign.name, error=str(e))

    def _save(self, job: CaptureJob) -> None:
        c, r = job.campaign, job.record
        how = (c.jpeg_quality, c.max_width)
        if how in r.encoded:
            done = r.encoded[how]
        elif r.image is not None:
            done = encode(r.image, how)
        else:  # a reload changed the campaign's encoding after the frame entered the ring
            first = next(iter(r.encoded.values()))
            decoded = cv2.imdecode(np.frombuffer(first.jpeg, np.uint8), cv2.IMREAD_COLOR)
            if decoded is None:
                raise ValueError("a pre-trigger JPEG could not be decoded")
            done = encode(decoded, how)
        jpeg = done.jpeg
        when = datetime.fromtimestamp(r.captured_wall, tz=timezone.utc)
        capture_id = f"{when:%Y%m%dT%H%M%S_%f}Z_{self._camera_safe}_{r.frame_id:09d}"
        sidecar = {
            "schema_version": SIDECAR_SCHEMA_VERSION,
            "campaign": c.name,
            "capture_id": capture_id,
            "image": f"{capture_id}.jpg",
            "image_sha256": hashlib.sha256(jpeg).hexdigest(),
            "width": done.width,
            "height": done.height,
            "jpeg_quality": c.jpeg_quality,
            "role": job.role,
            "offset": job.offset,
            "captured_at": utc_iso(r.captured_wall),
            "camera": self._camera,
            "model": self.model_id,
            "model_version": self.model_version,
            "seq": r.seq,
            "frame_id": r.frame_id,
            "tags": [{"tag": k, "score": v} for k, v in sorted(r.tags.items())],
            "top": {g: {"label": l, "score": s} for g, (l, s) in r.top.items()},
            "regions": [{"tag": x.key, "score": x.score, "box": list(x.box)} for x in r.regions],
        }
        item, evicted = self.store.save(c.name, f"{when:%Y-%m-%d}", capture_id, jpeg, sidecar)
        if self.disk_full:
            log.info("store_space_returned", directory=str(self.store.directory))
            self.disk_full = False
        self._metrics.captures_saved.labels(campaign=c.name).inc()
        for old in evicted:
            self._metrics.captures_evicted.labels(campaign=old.campaign).inc()
        self._update_gauges()
        self._saved.put(SavedCapture(job, item))

    def _update_gauges(self) -> None:
        self._metrics.store_bytes.set(self.store.bytes)
        self._metrics.store_files.set(self.store.files)
