"""Hot reload on SIGHUP: rebuild config and model off the frame loop, swap between frames.

The new bundle is verified completely (hashes, contract, warm-up) on a background thread;
only a fully built pipeline is handed to the frame loop, so a bad bundle is refused and the
old one keeps running. Camera, publish, metrics and store settings need a restart: a
reload that changes them says so in the log and leaves them as they are.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import structlog

from retrofit_agent.daemon.config import AgentConfig
from retrofit_agent.contract.errors import RetrofitError

log = structlog.get_logger("retrofit_agent.daemon.reload")

RELOADABLE = ("model", "labels", "collect")


@dataclass(frozen=True)
class Reloaded:
    config: AgentConfig
    pipeline: object  # a ModelPipeline (typed loosely: this module stays import-light)


class Reloader:
    def __init__(
        self,
        load_config: Callable[[], AgentConfig],
        build: Callable[[AgentConfig], object],
        on_result: Callable[[str], None] = lambda result: None,
    ) -> None:
        self._load_config = load_config
        self._build = build
        self._on_result = on_result
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready: Reloaded | None = None

    def request(self, current: AgentConfig) -> bool:
        """Start a reload unless one is running. Returns whether one was started."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                log.info("reload_already_running")
                return False
            self._thread = threading.Thread(target=self._run, args=(current,), name="reload", daemon=True)
            self._thread.start()
            return True

    def poll(self) -> Reloaded | None:
        """The finished reload, once, if there is one (called by the frame loop)."""
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def wait(self, timeout: float) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    def _run(self, current: AgentConfig) -> None:
        log.info("reload_started")
        try:
            new = self._load_config()
            ignored = [s for s in ("camera", "publish", "metrics", "log") if getattr(new, s) != getattr(current, s)]
            if new.collect.store != current.collect.store:
                ignored.append("collect.store")
            if ignored:
                log.warning("reload_ignored_settings", sections=ignored, hint="restart the daemon to apply them")
            merged = current.model_copy(update={"model": new.model, "labels": new.labels, "collect": new.collect.model_copy(update={"store": current.collect.store})})
            pipeline = self._build(merged)
        except RetrofitError as e:
            log.error("reload_failed", error=str(e), action="keeping the running bundle")
            self._on_result("failed")
            return
        except Exception as e:  # thread boundary: a broken reload must never take the daemon down
            log.error("reload_failed", error=f"{type(e).__name__}: {e}", action="keeping the running bundle")
            self._on_result("failed")
            return
        with self._lock:
            self._ready = Reloaded(merged, pipeline)
        self._on_result("ok")
