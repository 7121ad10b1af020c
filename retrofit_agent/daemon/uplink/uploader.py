"""Captured images off the car: every pair in the daemon's store, in capture order, to an
S3-compatible store (or, without one, small JPEGs over MQTT), deleted locally only once the
backend confirmed it.

The store is the queue: the uplink scans it (and is woken by ``captures`` messages), so
uploads resume after outages and crashes without any list of its own. The store's contract
holds (``daemon/collect/store.py``):

- a pair is complete once its sidecar exists (written last): the sidecar is opened first,
  then the image, and the image's SHA-256 must equal the sidecar's ``image_sha256``;
- eviction never takes a pair being uploaded away: both files are held open for the whole
  upload, and an unlinked file stays readable through an open descriptor; if the daemon
  evicted the pair meanwhile, the upload still completes with the complete bytes;
- after the backend confirmed (HEAD: size and the sha256 the store verified on receipt),
  the sidecar is deleted first, then the image.

Keys: ``<prefix>/<vehicle>/<campaign>/<date>/<file>``, a pure function of the pair, so an
upload repeated after a crash overwrites the same objects: each pair is in the bucket once.
Multipart uploads (files >= ``s3.multipart_threshold``) record their upload id and each
confirmed part in the journal database, and resume from the next part after a crash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from retrofit_agent.daemon.uplink.config import CapturesConfig, S3Config
from retrofit_agent.daemon.uplink.metrics import UplinkMetrics
from retrofit_agent.daemon.uplink.s3 import S3Client, S3Error, multipart_etag
from retrofit_agent.daemon.uplink.source import topic_level

log = structlog.get_logger("retrofit_agent.daemon.uplink.uploader")


class SkipPair(Exception):
    """This pair cannot be uploaded now or ever (gone, corrupt, too large); go on with the next."""


@dataclass(frozen=True)
class Pair:
    sidecar: Path
    image: Path
    campaign: str
    day: str

    @property
    def name(self) -> str:
        return self.sidecar.stem


def scan(directory: Path) -> list[Pair]:
    """Complete pairs (sidecar present), oldest capture first (file names start with the UTC time)."""
    pairs = []
    for sidecar in directory.rglob("*.json"):
        if sidecar.name.startswith("."):
            continue
        rel = sidecar.relative_to(directory).parts
        if len(rel) != 3:
            continue
        pairs.append(Pair(sidecar, sidecar.with_suffix(".jpg"), rel[0], rel[1]))
    pairs.sort(key=lambda p: (p.sidecar.name, p.campaign))
    return pairs


class Publisher(Protocol):  # the part of mqtt.Link the fallback needs
    def publish_and_wait(self, topic: str, payload: bytes, timeout_s: float) -> bool: ...


class CaptureUploader:
    """Runs on its own thread; owns its own connection to the journal database."""

    def __init__(
        self,
        cfg: CapturesConfig,
        s3cfg: S3Config | None,
        s3: S3Client | None,
        vehicle: str,
        db: sqlite3.Connection,
        link: Publisher | None,
        topic_prefix: str,
        metrics: UplinkMetrics,
        stop: threading.Event,
    ) -> None:
        assert cfg.directory is not None
        self.directory = Path(cfg.directory)
        self.cfg, self.s3cfg, self.s3 = cfg, s3cfg, s3
        self.vehicle, self.db, self.link, self.topic_prefix = vehicle, db, link, topic_prefix
        self.metrics = metrics
        self.stop = stop
        self._wake = threading.Event()
        self._skipped: set[Path] = set()  # corrupt or too large: said once, left on board
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="capture-uploader", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def join(self, timeout: float) -> None:
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        self._abort_strays()
        while not self.stop.is_set():
            try:
                self.run_once()
            except Exception as e:  # thread boundary: log, count, wait, go on
                self.metrics.capture_failures.labels(reason="error").inc()
                log.error("capture_upload_loop_failed", error=str(e))
                self.stop.wait(self.cfg.retry_s)
            self._wake.wait(self.cfg.rescan_interval_s)
            self._wake.clear()

    def run_once(self) -> int:
        """Upload every complete pair there is now, in order; stop at the first transient failure
        (the backend is down: try again later, in the same order). Returns the pairs uploaded."""
        if not self.directory.is_dir():
            return 0
        pairs = [p for p in scan(self.directory) if p.sidecar not in self._skipped]
        self.metrics.captures_pending.set(len(pairs))
        done = 0
        for pair in pairs:
            if self.stop.is_set():
                break
            try:
                self.upload(pair)
                done += 1
                self.metrics.captures_pending.dec()
            except SkipPair:
                continue
            except S3Error as e:
                self.metrics.capture_failures.labels(reason="transient" if e.transient else "refused").inc()
                log.warning(
                    "capture_upload_failed",
                    capture=pair.name,
                    status=e.status,
                    code=e.code,
                    error=str(e),
                    retry_s=self.cfg.retry_s,
                )
                self.stop.wait(self.cfg.retry_s)
                break
        return done

    # ------------------------------------------------------------------ one pair

    def upload(self, pair: Pair) -> None:
        try:
            sidecar_f = open(pair.sidecar, "rb")  # noqa: SIM115 - held open across the upload (see module doc)
        except FileNotFoundError:
            raise SkipPair from None  # evicted or deleted since the scan
        with sidecar_f:
            try:
                image_f = open(pair.image, "rb")  # noqa: SIM115
            except FileNotFoundError:
                raise SkipPair from None
            with image_f:
                meta_bytes = sidecar_f.read()
                image = image_f.read()
                meta = self._check(pair, meta_bytes, image)
                if self.s3 is not None and self.s3cfg is not None:
                    self._to_s3(pair, meta_bytes, image, meta["image_sha256"])
                    transport = "s3"
                else:
                    self._to_mqtt(pair, meta, image)
                    transport = "mqtt"
        # Confirmed: sidecar first, then the image (the store's contract for uploaders).
        pair.sidecar.unlink(missing_ok=True)
        pair.image.unlink(missing_ok=True)
        self._forget(pair)
        self.metrics.captures_uploaded.labels(transport=transport).inc()
        self.metrics.capture_bytes_uploaded.inc(len(image) + len(meta_bytes))
        log.info("capture_uploaded", capture=pair.name, campaign=pair.campaign, bytes=len(image), via=transport)

    def _check(self, pair: Pair, meta_bytes: bytes, image: bytes) -> dict[str, Any]:
        try:
            meta = json.loads(meta_bytes)
            expected = str(meta["image_sha256"])
        except (ValueError, KeyError, TypeError):
            self._skip(pair, "bad_sidecar")
        if hashlib.sha256(image).hexdigest() != expected:
            self._skip(pair, "checksum")
        return dict(meta)

    def _skip(self, pair: Pair, reason: str) -> None:
        self._skipped.add(pair.sidecar)
        self.metrics.capture_failures.labels(reason=reason).inc()
        log.error(
            "capture_not_uploaded", capture=pair.name, reason=reason, path=str(pair.sidecar), action="left on board"
        )
        raise SkipPair

    def key(self, pair: Pair, suffix: str) -> str:
        assert self.s3cfg is not None
        return f"{self.s3cfg.prefix}/{self.vehicle}/{pair.campaign}/{pair.day}/{pair.name}{suffix}"

    def _to_s3(self, pair: Pair, meta_bytes: bytes, image: bytes, sha: str) -> None:
        assert self.s3 is not None and self.s3cfg is not None
        image_key, meta_key = self.key(pair, ".jpg"), self.key(pair, ".json")
        if len(image) >= self.s3cfg.multipart_threshold:
            self._multipart(pair, image_key, image, sha)
        else:
            self.s3.put_object(image_key, image, sha, {"sha256": sha}, content_type="image/jpeg")
        meta_sha = hashlib.sha256(meta_bytes).hexdigest()
        self.s3.put_object(meta_key, meta_bytes, meta_sha, {"sha256": meta_sha}, content_type="application/json")
        # The backend's word that both are there, whole: size and the sha256 it checked on receipt.
        for key, size, digest in ((image_key, len(image), sha), (meta_key, len(meta_bytes), meta_sha)):
            head = self.s3.head_object(key)
            if head is None or int(head.get("content-length", -1)) != size or head.get("x-amz-meta-sha256") != digest:
                raise S3Error(0, "NotConfirmed", f"{key}: the store does not hold it whole yet")

    def _multipart(self, pair: Pair, key: str, image: bytes, sha: str) -> None:
        assert self.s3 is not None and self.s3cfg is not None
        size = self.s3cfg.part_size
        row = self.db.execute(
            "SELECT key, upload_id, parts FROM uploads WHERE sidecar = ?", (str(pair.sidecar),)
        ).fetchone()
        parts: dict[int, str] = {}
        if row is not None and row[0] == key:
            upload_id, parts = row[1], {int(n): e for n, e in json.loads(row[2])}
            log.info("capture_upload_resumed", capture=pair.name, parts_done=len(parts))
        else:
            upload_id = self.s3.create_multipart(key, {"sha256": sha}, content_type="image/jpeg")
            self._record(pair, key, upload_id, parts)
        md5s = []
        try:
            for number, offset in enumerate(range(0, len(image), size), start=1):
                chunk = image[offset : offset + size]
                md5 = hashlib.md5(chunk)  # noqa: S324 - S3's part ETag
                md5s.append(md5.digest())
                if parts.get(number) == md5.hexdigest():
                    continue
                etag = self.s3.upload_part(key, upload_id, number, chunk)
                if etag != md5.hexdigest():
                    raise S3Error(0, "BadPartEtag", f"part {number} of {key}: the store holds other bytes")
                parts[number] = etag
                self._record(pair, key, upload_id, parts)
            etag = self.s3.complete_multipart(key, upload_id, sorted(parts.items()))
        except S3Error as e:
            if e.code != "NoSuchUpload":
                raise
            # Completed just before a crash, or forgotten by the store: the object itself decides.
            head = self.s3.head_object(key)
            if (
                head is not None
                and head.get("x-amz-meta-sha256") == sha
                and int(head.get("content-length", -1)) == len(image)
            ):
                return
            self._forget(pair)
            raise S3Error(0, "UploadLost", f"{key}: the store forgot the multipart upload; starting over") from None
        if etag != multipart_etag(md5s):
            raise S3Error(0, "BadEtag", f"{key}: the assembled object is not the parts sent")

    def _record(self, pair: Pair, key: str, upload_id: str, parts: dict[int, str]) -> None:
        self.db.execute(
            "INSERT INTO uploads (sidecar, key, upload_id, parts) VALUES (?, ?, ?, ?) ON CONFLICT (sidecar) "
            "DO UPDATE SET key = excluded.key, upload_id = excluded.upload_id, parts = excluded.parts",
            (str(pair.sidecar), key, upload_id, json.dumps(sorted(parts.items()))),
        )

    def _forget(self, pair: Pair) -> None:
        self.db.execute("DELETE FROM uploads WHERE sidecar = ?", (str(pair.sidecar),))

    def _abort_strays(self) -> None:
        """Multipart uploads the store holds under our prefix that no journal row knows (a crash between
        starting one and recording it) are aborted, so no orphan parts stay behind."""
        if self.s3 is None or self.s3cfg is None:
            return
        known = {r[0] for r in self.db.execute("SELECT upload_id FROM uploads")}
        try:
            for key, upload_id in self.s3.list_multipart(f"{self.s3cfg.prefix}/{self.vehicle}/"):
                if upload_id not in known:
                    self.s3.abort_multipart(key, upload_id)
                    log.info("stray_multipart_aborted", key=key)
        except S3Error as e:
            log.warning("stray_multipart_check_failed", error=str(e))

    # ------------------------------------------------------------------ fallback

    def _to_mqtt(self, pair: Pair, meta: dict[str, Any], image: bytes) -> None:
        if self.link is None or not self.cfg.mqtt_max_bytes or len(image) > self.cfg.mqtt_max_bytes:
            self._skip(pair, "too_large_for_mqtt")
        assert self.link is not None
        camera = topic_level(str(meta.get("camera", "camera")))
        topic = f"{self.topic_prefix}/{self.vehicle}/{camera}/capture_files"
        payload = json.dumps(
            {
                "vehicle": self.vehicle,
                "campaign": pair.campaign,
                "day": pair.day,
                "name": pair.name,
                "sidecar": meta,
                "image_base64": base64.b64encode(image).decode(),
            }
        ).encode()
        if not self.link.publish_and_wait(topic, payload, timeout_s=30):
            raise S3Error(0, "NoPuback", "the broker did not acknowledge the capture")


def open_state_db(directory: Path) -> sqlite3.Connection:
    """The uploader's own connection to the journal database (uploads table)."""
    from retrofit_agent.daemon.uplink.journal import FILE_NAME

    conn = sqlite3.connect(directory / FILE_NAME, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")
    return conn
