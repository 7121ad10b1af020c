"""The on-disk capture store: atomic JPEG + JSON sidecar pairs under a size and count cap.

Layout (documented for uploaders in the README)::

    <directory>/<campaign>/<YYYY-MM-DD>/<capture id>.jpg
    <directory>/<campaign>/<YYYY-MM-DD>/<capture id>.json   # written last: the commit marker

A pair is written as: image to a dot-prefixed temp file, fsync; sidecar likewise; rename
the image, rename the sidecar, fsync the directory. So a sidecar never exists without its
complete image. A crash can leave temp files or, between the two renames, an image with no
sidecar; start-up recovery removes both. Uploaders take items whose ``.json`` exists and
may delete pairs at any time (sidecar first); the store tolerates files vanishing.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("retrofit_agent.daemon.collect.store")

TMP_PREFIX = "."
TMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    pass


@dataclass(frozen=True)
class StoredItem:
    campaign: str
    image: Path
    sidecar: Path
    bytes: int


def _write_durable(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> int:
    """Remove a file if it still exists; returns the bytes freed (0 if it was gone)."""
    try:
        size = path.stat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return 0


class CaptureStore:
    """Owned by one writer thread; ``bytes``/``files`` may be read from any thread."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        max_files: int,
        write_file: Callable[[Path, bytes], None] = _write_durable,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._write_file = write_file
        self._items: deque[StoredItem] = deque()
        self._lock = threading.Lock()
        self.bytes = 0

    @property
    def files(self) -> int:
        return len(self._items)

    # ------------------------------------------------------------------ start-up

    def open(self) -> dict[str, int]:
        """Create the directory, remove what a crash left half-done, index what is there."""
        self.directory.mkdir(parents=True, exist_ok=True)
        removed = {"temp_files": 0, "orphan_images": 0}
        for path in self.directory.rglob("*"):
            if not path.is_file():
                continue
            if path.name.startswith(TMP_PREFIX) and path.name.endswith(TMP_SUFFIX):
                _unlink(path)
                removed["temp_files"] += 1
            elif path.suffix == ".jpg" and not path.with_suffix(".json").exists():
                _unlink(path)
                removed["orphan_images"] += 1
        self.rescan()
        return removed

    def rescan(self) -> None:
        """Rebuild the index from disk, oldest first (an uploader may have deleted pairs)."""
        items = []
        for sidecar in self.directory.rglob("*.json"):
            if sidecar.name.startswith(TMP_PREFIX):
                continue
            image = sidecar.with_suffix(".jpg")
            try:
                size = image.stat().st_size + sidecar.stat().st_size
            except FileNotFoundError:
                continue
            campaign = sidecar.relative_to(self.directory).parts[0]
            items.append((sidecar.name, StoredItem(campaign, image, sidecar, size)))
        items.sort(key=lambda t: t[0])  # names start with the UTC capture time
        with self._lock:
            self._items = deque(item for _, item in items)
            self.bytes = sum(i.bytes for i in self._items)

    # ------------------------------------------------------------------ writing

    def save(
        self, campaign: str, day: str, capture_id: str, jpeg: bytes, sidecar: dict[str, Any]
    ) -> tuple[StoredItem, list[StoredItem]]:
        """Write one pair atomically; evict the oldest to stay under the caps.

        Returns the stored item and the evicted ones. Raises DiskFullError on ENOSPC (after
        removing its temp files) and OSError on other failures.
        """
        folder = self.directory / campaign / day
        image = folder / f"{capture_id}.jpg"
        meta = folder / f"{capture_id}.json"
        tmp_image = folder / f"{TMP_PREFIX}{capture_id}.jpg{TMP_SUFFIX}"
        tmp_meta = folder / f"{TMP_PREFIX}{capture_id}.json{TMP_SUFFIX}"
        body = (json.dumps(sidecar, sort_keys=True) + "\n").encode()
        # Evict before creating the folder: eviction removes day folders it empties.
        evicted = self._make_room(len(jpeg) + len(body))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._write_file(tmp_image, jpeg)
            self._write_file(tmp_meta, body)
            os.replace(tmp_image, image)
            os.replace(tmp_meta, meta)
            _fsync_dir(folder)
        except OSError as e:
            _unlink(tmp_image)
            _unlink(tmp_meta)
            if e.errno == errno.ENOSPC:
                if not meta.exists():
                    _unlink(image)
                raise DiskFullError(errno.ENOSPC, "no space left on device", str(folder)) from None
            raise
        item = StoredItem(campaign, image, meta, len(jpeg) + len(body))
        with self._lock:
            self._items.append(item)
            self.bytes += item.bytes
        return item, evicted

    def _make_room(self, incoming: int) -> list[StoredItem]:
        evicted = []
        while self._items and (self.bytes + incoming > self.max_bytes or len(self._items) + 1 > self.max_files):
            with self._lock:
                oldest = self._items.popleft()
                self.bytes -= oldest.bytes
            # Sidecar first: an uploader never sees a sidecar whose image is gone.
            freed = _unlink(oldest.sidecar) + _unlink(oldest.image)
            if freed:  # an item the uploader already took is not an eviction
                evicted.append(oldest)
            try:
                oldest.image.parent.rmdir()  # drop a day folder once it is empty
            except OSError:
                pass
        return evicted
