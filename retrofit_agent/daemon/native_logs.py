"""Native libraries' stderr (OpenCV, FFmpeg) turned into structured, rate-limited log events.

OpenCV and FFmpeg write straight to file descriptor 2 from C code: a corrupt stream can
print hundreds of unstructured lines ("[h264 @ 0x…] error while decoding MB …") into the
journal between our JSON lines. The daemon moves its own ``sys.stderr`` to a duplicate of
the original descriptor, points fd 2 at a pipe, and a reader thread turns each native line
into a ``native_log`` event, at most ``burst`` per ``window_s`` (the rest are counted in a
``native_log_suppressed`` event). Python's own output (our logs, a traceback) never passes
through the pipe, so nothing is lost if the process dies.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

import structlog


def _library(line: str) -> str:
    if line.startswith("[ WARN") or line.startswith("[ERROR") or line.startswith("[ INFO"):
        return "opencv"
    m = re.match(r"^\[([A-Za-z0-9_ ]+) @ 0x[0-9a-f]+\]", line)
    return f"ffmpeg:{m.group(1).strip()}" if m else "native"


class RateLimiter:
    """At most ``burst`` events per ``window_s``; counts what it turns away."""

    def __init__(self, burst: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.window_s, self._clock = burst, window_s, clock
        self._start = clock()
        self._count = 0
        self.suppressed = 0

    def allow(self) -> tuple[bool, int]:
        """(whether to emit this one, how many were suppressed in the window that just ended)."""
        now, ended = self._clock(), 0
        if now - self._start >= self.window_s:
            ended, self.suppressed = self.suppressed, 0
            self._start, self._count = now, 0
        self._count += 1
        if self._count > self.burst:
            self.suppressed += 1
            return False, ended
        return True, ended


class NativeStderr:
    """Owns fd 2 while the daemon runs; see the module docstring."""

    def __init__(self, burst: int = 20, window_s: float = 10.0) -> None:
        self._limiter = RateLimiter(burst, window_s)
        self._saved_fd: int | None = None
        self._read_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._log = structlog.get_logger("retrofit_agent.native")
        self.stream: TextIO = sys.stderr

    def start(self, debug: bool = False) -> TextIO:
        """Redirect fd 2 into the pipe; returns the stream Python's own output should use.

        The libraries' own levels are set first, so the pipe carries only what is worth a
        line: OpenCV warnings and FFmpeg errors (all of it under ``debug``).
        """
        _set_library_levels(debug)
        try:
            self._saved_fd = os.dup(2)
            read_fd, write_fd = os.pipe()
        except OSError:  # no fd 2 to take over (closed): leave everything as it is
            return sys.stderr
        sys.stderr.flush()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        self.stream = os.fdopen(os.dup(self._saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
        sys.stderr = self.stream
        self._thread = threading.Thread(target=self._pump, name="native-stderr", daemon=True)
        self._thread.start()
        return self.stream

    def stop(self) -> None:
        """Give fd 2 back; lines still in the pipe are logged first."""
        if self._saved_fd is None:
            return
        os.dup2(self._saved_fd, 2)  # closes the pipe's last writer: the reader sees EOF
        os.close(self._saved_fd)
        self._saved_fd = None
        if self._thread is not None:
            self._thread.join(1.0)

    def _pump(self) -> None:
        assert self._read_fd is not None
        with os.fdopen(self._read_fd, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._emit(raw)
            if pending:
                self._emit(pending)

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            return
        ok, ended = self._limiter.allow()
        if ended:
            self._log.warning("native_log_suppressed", count=ended)
        if ok:
            self._log.warning("native_log", library=_library(line), text=line[:500])


def _set_library_levels(debug: bool) -> None:
    # FFmpeg's level is read by OpenCV's FFmpeg backend when it first loads (AV_LOG_ERROR is
    # 16, AV_LOG_VERBOSE 40); an operator's own OPENCV_FFMPEG_LOGLEVEL wins.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "40" if debug else "16")
    try:
        import cv2

        cv2.utils.logging.setLogLevel(
            cv2.utils.logging.LOG_LEVEL_DEBUG if debug else cv2.utils.logging.LOG_LEVEL_WARNING
        )
    except (ImportError, AttributeError):  # an OpenCV build without the logging module
        pass
