"""The daemon's composition root: builds every component from the config, in order, and runs
the frame loop. The only place that knows how the parts fit together; the CLI
(:mod:`retrofit_agent.daemon.cli`) parses argv and hands it a validated config.

Order matters: refuse what no waiting can fix before anything starts; bind the publisher
and metrics first (a taken port fails in milliseconds, and subscribers connect while the
model loads); verify and warm up the model; check the memory budget; then the collector,
the grabber and the loop; READY last.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry

from retrofit_agent import __version__
from retrofit_agent.contract.bundle import read_manifest
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.agent import Agent, AgentIO, LoopSettings
from retrofit_agent.daemon.budget import check_memory_budget
from retrofit_agent.daemon.budget_cpu import build_pacer
from retrofit_agent.daemon.capture import FrameGrabber
from retrofit_agent.daemon.collect.collector import Collector, check_campaign_regions, check_campaign_tags
from retrofit_agent.daemon.config import AgentConfig
from retrofit_agent.daemon.curve import is_loopback_endpoint, is_loopback_host
from retrofit_agent.daemon.lifecycle import StopSignal, SystemdNotifier
from retrofit_agent.daemon.metrics import AgentMetrics, serve_metrics
from retrofit_agent.daemon.outputs import Outputs
from retrofit_agent.daemon.pipeline import ModelPipeline, build_pipeline
from retrofit_agent.daemon.publish import Publisher
from retrofit_agent.daemon.reload import Reloader
from retrofit_agent.daemon.sources import camera_id, check_source, open_source, resolve_kind
from retrofit_agent.daemon.variants import record


def run_daemon(cfg: AgentConfig, reload_config: Callable[[], AgentConfig]) -> int:
    """Wire the daemon in order and run its frame loop; returns the exit code. Raises RetrofitError."""
    camera = camera_id(cfg.camera)
    log = structlog.get_logger("retrofit_agent").bind(camera=camera)
    stop = StopSignal()
    stop.install()
    notifier = SystemdNotifier()
    metrics = AgentMetrics.create(CollectorRegistry(auto_describe=True))
    _preflight(cfg)
    log.info("agent_starting", version=__version__, source_kind=cfg.camera.kind, bundle=str(cfg.model.bundle))
    with ExitStack() as stack:
        stack.callback(notifier.close)
        # Bind first: a taken port fails in milliseconds, and subscribers can connect while
        # the model loads instead of missing the first frames.
        run_id = uuid.uuid4().hex  # one per daemon start: in every message, and the replay's key
        publisher = Publisher(cfg.publish, metrics, run_id=run_id)
        stack.callback(publisher.close)
        metrics_port = None
        if cfg.metrics.enabled:
            server, _ = serve_metrics(metrics.registry, cfg.metrics.host, cfg.metrics.port)
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            metrics_port = server.server_port

        def build(c: AgentConfig) -> ModelPipeline:
            p = build_pipeline(c, log)
            _check_campaigns(c, p)
            return p

        pipeline = build(cfg)
        # Logged once the bundle loaded, so that a bad bundle's error line follows only agent_starting.
        log.info(
            "publishing",
            endpoint=publisher.endpoint,
            curve=publisher.encrypted,
            replay=publisher.replay.endpoint if publisher.replay is not None else None,
        )
        if not is_loopback_endpoint(cfg.publish.endpoint):
            log.warning("publishing_beyond_loopback", endpoint=cfg.publish.endpoint, curve=publisher.encrypted)
        if metrics_port is not None:
            log.info("metrics_serving", address=f"{cfg.metrics.host}:{metrics_port}")
            if not is_loopback_host(cfg.metrics.host):
                log.warning("metrics_beyond_loopback", address=cfg.metrics.address)
        need = check_memory_budget(cfg, pipeline.model_path.stat().st_size)  # before any source
        log.info("memory_budget", worst_case_mb=round(need.total / 2**20), parts=need.describe())
        m = pipeline.bundle.manifest
        metrics.set_model(m.model_id, m.version, m.trained, camera)
        if pipeline.choice is not None:
            record(pipeline.choice, metrics.budget)
        pacer = build_pacer(cfg.budget, log)
        collector = _start_collector(cfg, pipeline, metrics, camera, stack)
        model_bytes = pipeline.model_path.stat().st_size
        grabber = FrameGrabber(cfg.camera, metrics, admit=lambda w, h: _admit(cfg, model_bytes, w, h))
        grabber.set_preparer(pipeline.prepare, pipeline.generation)
        grabber.start()
        stack.callback(grabber.stop)
        reloader = Reloader(
            cfg,
            pipeline,
            reload_config,
            build,
            collecting=collector is not None,
            on_result=lambda r: metrics.reloads.labels(result=r).inc(),
        )
        settings = LoopSettings(cfg.publish.status_interval_s, cfg.camera.stall_timeout_s, cfg.max_frames)
        outputs = Outputs(publisher, camera, cfg.publish.vehicle, run_id)
        io = AgentIO(grabber, outputs, metrics, notifier, stop, collector, reloader, pacer)
        agent = Agent(settings, pipeline, io)
        metrics.ready.set(1)
        notifier.ready(f"labelling {camera} with {pipeline.model_id}")
        log.info("agent_ready", model=pipeline.model_id, vehicle=outputs.vehicle, run_id=outputs.run_id)
        try:
            code = agent.run()
        finally:
            notifier.stopping()
            metrics.ready.set(0)
        processed = metrics.registry.get_sample_value("retrofit_frames_processed_total")
        log.info("agent_stopped", reason=stop.reason or "finished", frames_processed=int(processed or 0))
        return code


def _preflight(cfg: AgentConfig) -> None:
    """Refuse, before any log line, binding or model load, what no waiting can fix: an
    unusable source kind, a missing or unreadable video file, a missing or invalid bundle
    manifest, campaigns naming tags the manifest does not have. (A live camera that is not
    there yet is waited for.)"""
    check_source(cfg.camera)
    if resolve_kind(cfg.camera) == "file":
        open_source(cfg.camera).release()
    bank = read_manifest(Path(cfg.model.bundle)).bank  # a missing or invalid bundle; hashes are checked at load
    if cfg.collect.campaigns:
        check_campaign_tags(cfg.collect, {f"{g.name}.{lab.name}" for g in bank.groups for lab in g.labels})


def _check_campaigns(cfg: AgentConfig, pipeline: ModelPipeline) -> None:
    if cfg.collect.campaigns:
        check_campaign_tags(cfg.collect, set(pipeline.bundle.bank.keys))
        localized = pipeline.regions.localized if pipeline.regions is not None else ()
        check_campaign_regions(cfg.collect, localized, pipeline.regions_unavailable)


def _start_collector(
    cfg: AgentConfig, pipeline: ModelPipeline, metrics: AgentMetrics, camera: str, stack: ExitStack
) -> Collector | None:
    """The collector exists only when campaigns are configured at start-up."""
    if not cfg.collect.campaigns:
        return None
    m = pipeline.bundle.manifest
    collector = Collector(cfg.collect, metrics, camera, (m.model_id, m.version))
    try:
        collector.start()
    except OSError as e:
        raise ConfigError(
            f"collect.store.directory: cannot use {cfg.collect.store.directory}: {e.strerror or e}"
        ) from None
    stack.callback(collector.stop)
    return collector


def _admit(cfg: AgentConfig, model_bytes: int, width: int, height: int) -> None:
    """The grabber's check of each source's frame size against the memory budget."""
    check_memory_budget(cfg, model_bytes, source=(width, height))
