"""Hot reload on SIGHUP: the one place that decides what a reload applies.

The config is read again (file, environment, flags); the bundle (``model.*``), the
labelling (``labels.*``), the regions (``regions.*``) and the campaigns
(``collect.campaigns``) are applied without a restart. The new bundle is verified completely (hashes, contract, warm-up) on a background
thread; only a fully built pipeline is handed to the frame loop, so a bad bundle is refused
and the old one keeps running. Everything else needs a restart: a reload that changes it
says so in the log and leaves it as it is. A reload whose bundle and labelling are the
same as the running ones keeps the running pipeline, so its tags do not go off and on (it
takes the new region finder, which holds no state).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from retrofit_agent.contract.errors import RetrofitError
from retrofit_agent.daemon.config import AgentConfig

if TYPE_CHECKING:
    from retrofit_agent.daemon.pipeline import ModelPipeline

log = structlog.get_logger("retrofit_agent.daemon.reload")


@dataclass(frozen=True)
class Reloaded:
    config: AgentConfig  # the running config with the reloadable parts of the new one
    pipeline: ModelPipeline  # the new pipeline, or the running one when the model is unchanged
    model_changed: bool


def merge(current: AgentConfig, new: AgentConfig, collecting: bool) -> tuple[AgentConfig, list[str]]:
    """The config a reload applies, and the changed settings it leaves for a restart."""
    ignored = [
        s
        for s in ("camera", "publish", "metrics", "log", "limits", "max_frames")
        if getattr(new, s) != getattr(current, s)
    ]
    if new.collect.store != current.collect.store:
        ignored.append("collect.store")
    campaigns = new.collect.campaigns
    if not collecting and campaigns != current.collect.campaigns:
        # The collector (its store and writer thread) exists only if campaigns were configured at start-up.
        ignored.append("collect.campaigns")
        campaigns = current.collect.campaigns
    merged = current.model_copy(
        update={
            "model": new.model,
            "labels": new.labels,
            "regions": new.regions,
            "collect": current.collect.model_copy(update={"campaigns": campaigns}),
        }
    )
    return merged, ignored


class Reloader:
    def __init__(
        self,
        current: AgentConfig,
        pipeline: ModelPipeline,
        load_config: Callable[[], AgentConfig],
        build: Callable[[AgentConfig], ModelPipeline],
        collecting: bool,
        on_result: Callable[[str], None] = lambda result: None,
    ) -> None:
        self._current, self._pipeline = current, pipeline
        self._load_config = load_config
        self._build = build
        self._collecting = collecting
        self._on_result = on_result
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready: Reloaded | None = None

    def request(self) -> bool:
        """Start a reload unless one is running. Returns whether one was started."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                log.info("reload_already_running")
                return False
            self._thread = threading.Thread(target=self._run, name="reload", daemon=True)
            self._thread.start()
            return True

    def poll(self) -> Reloaded | None:
        """The finished reload, once, if there is one (the frame loop applies it)."""
        with self._lock:
            ready, self._ready = self._ready, None
            if ready is not None:
                self._current, self._pipeline = ready.config, ready.pipeline
        return ready

    def _run(self) -> None:
        log.info("reload_started")
        current, running = self._current, self._pipeline
        try:
            merged, ignored = merge(current, self._load_config(), self._collecting)
            if ignored:
                log.warning("reload_ignored_settings", sections=ignored, hint="restart the daemon to apply them")
            pipeline = self._build(merged)
        except RetrofitError as e:
            log.error("reload_failed", error=str(e), action="keeping the running bundle")
            self._on_result("failed")
            return
        except Exception as e:  # thread boundary: a broken reload must never take the daemon down
            log.error("reload_failed", error=f"{type(e).__name__}: {e}", action="keeping the running bundle")
            self._on_result("failed")
            return
        changed = pipeline.bundle.manifest != running.bundle.manifest or merged.labels != current.labels
        with self._lock:
            self._ready = Reloaded(merged, pipeline if changed else running.with_regions_of(pipeline), changed)
        self._on_result("ok")
