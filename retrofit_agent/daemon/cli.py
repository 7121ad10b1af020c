"""Command line and composition root.

``retrofit-agent [flags]`` runs the daemon; ``retrofit-agent tail|schema|sample-clip``
are helper subcommands. This is the only place that parses argv, reads the environment,
configures logging, installs signal handlers and wires components together.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import structlog
from prometheus_client import CollectorRegistry

from retrofit_agent import __version__
from retrofit_agent.daemon.config import AgentConfig, load_config
from retrofit_agent.contract.errors import ConfigError, RetrofitError

PROG = "retrofit-agent"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fail(err: RetrofitError) -> int:
    sys.stderr.write(f"{PROG}: error: {err}\n")
    return err.exit_code


# --------------------------------------------------------------------------- run


def run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Real-time zero-shot image labelling on an in-car camera.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", type=Path, help="TOML config file (default: $RETROFIT_CONFIG)")
    p.add_argument("--camera", dest="camera.source", metavar="SOURCE",
                   help="/dev/videoN, a device index, a video file, an rtsp/http URL or a GStreamer pipeline")
    p.add_argument("--camera-id", dest="camera.id", metavar="ID", help="camera id in messages and metrics")
    p.add_argument("--loop", dest="camera.loop", action="store_true", default=None, help="loop a video file")
    p.add_argument("--realtime", dest="camera.realtime", action="store_true", default=None,
                   help="pace a video file at its frame rate, like a live camera")
    p.add_argument("--bundle", dest="model.bundle", metavar="DIR", help="model bundle directory")
    p.add_argument("--threads", dest="model.intra_op_threads", type=int, metavar="N",
                   help="onnxruntime intra-op threads (0: onnxruntime's default)")
    p.add_argument("--publish", dest="publish.endpoint", metavar="ENDPOINT",
                   help="ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5556 or ipc:///run/retrofit-agent/tags")
    p.add_argument("--metrics-address", dest="metrics.address", metavar="HOST:PORT",
                   help="Prometheus /metrics address")
    p.add_argument("--no-metrics", dest="metrics.enabled", action="store_false", default=None,
                   help="do not serve /metrics")
    p.add_argument("--max-frames", dest="max_frames", type=int, metavar="N", help="stop after N processed frames")
    p.add_argument("--log-format", dest="log.format", choices=("json", "console"))
    p.add_argument("--log-level", dest="log.level", choices=("debug", "info", "warning", "error"))
    return p


def run(argv: Sequence[str], environ: dict[str, str] | None = None) -> int:
    args = vars(run_parser().parse_args(argv))
    config_file = args.pop("config")
    environ = dict(os.environ) if environ is None else environ
    try:
        cfg = load_config(config_file, environ, args)
    except RetrofitError as e:
        return _fail(e)
    from retrofit_agent.contract.logs import configure_logging

    configure_logging(cfg.log.format, cfg.log.level)
    try:
        # SIGHUP re-reads the same sources: the file (changed on disk), environment and flags.
        return _run_daemon(cfg, lambda: load_config(config_file, environ, args))
    except RetrofitError as e:
        return _fail(e)


def _run_daemon(cfg: AgentConfig, reload_config: Callable[[], AgentConfig]) -> int:
    # Imported here so `retrofit-agent tail` and `--help` stay fast and light.
    from retrofit_agent.daemon.agent import Agent, AgentIO
    from retrofit_agent.daemon.capture import FrameGrabber, camera_id
    from retrofit_agent.daemon.lifecycle import StopSignal, SystemdNotifier
    from retrofit_agent.daemon.metrics import AgentMetrics, serve_metrics
    from retrofit_agent.daemon.pipeline import build_pipeline
    from retrofit_agent.daemon.publish import Publisher
    from retrofit_agent.daemon.reload import Reloader
    from retrofit_agent.daemon.curve import is_loopback_endpoint, is_loopback_host

    camera = camera_id(cfg.camera)
    log = structlog.get_logger("retrofit_agent").bind(camera=camera)
    stop = StopSignal()
    stop.install()
    notifier = SystemdNotifier()
    metrics = AgentMetrics.create(CollectorRegistry(auto_describe=True))
    log.info("agent_starting", version=__version__, source_kind=cfg.camera.kind, bundle=str(cfg.model.bundle))
    with ExitStack() as stack:
        stack.callback(notifier.close)
        # Bind first: a taken port fails in milliseconds, and subscribers can connect while
        # the model loads instead of missing the first frames.
        publisher = Publisher(cfg.publish, metrics)
        stack.callback(publisher.close)
        log.info("publishing", endpoint=publisher.endpoint, curve=publisher.encrypted)
        if not is_loopback_endpoint(cfg.publish.endpoint):
            log.warning("publishing_beyond_loopback", endpoint=cfg.publish.endpoint, curve=publisher.encrypted)
        if cfg.metrics.enabled:
            server, _ = serve_metrics(metrics.registry, cfg.metrics.host, cfg.metrics.port)
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            log.info("metrics_serving", address=f"{cfg.metrics.host}:{server.server_port}")
            if not is_loopback_host(cfg.metrics.host):
                log.warning("metrics_beyond_loopback", address=cfg.metrics.address)

        def build(c: AgentConfig):
            p = build_pipeline(c, log)
            _check_campaigns(c, p)
            return p

        pipeline = build(cfg)
        m = pipeline.bundle.manifest
        metrics.set_model(m.model_id, m.version, m.trained, camera)
        collector = _start_collector(cfg, pipeline, metrics, camera, stack)
        grabber = FrameGrabber(cfg.camera, metrics, prepare=pipeline.prepare)
        grabber.start()
        stack.callback(grabber.stop)
        reloader = Reloader(reload_config, build, on_result=lambda r: metrics.reloads.labels(result=r).inc())
        agent = Agent(cfg, pipeline, AgentIO(grabber, publisher, metrics, notifier, stop, collector, reloader), camera)
        metrics.ready.set(1)
        notifier.ready(f"labelling {camera} with {pipeline.model_id}")
        log.info("agent_ready", model=pipeline.model_id)
        try:
            code = agent.run()
        finally:
            notifier.stopping()
            metrics.ready.set(0)
        processed = metrics.registry.get_sample_value("retrofit_frames_processed_total")
        log.info("agent_stopped", reason=stop.reason or "finished", frames_processed=int(processed or 0))
        return code


def _check_campaigns(cfg: AgentConfig, pipeline) -> None:
    from retrofit_agent.daemon.collect.collector import check_campaign_tags

    if cfg.collect.campaigns:
        check_campaign_tags(cfg.collect, set(pipeline.bundle.bank.keys))


def _start_collector(cfg: AgentConfig, pipeline, metrics, camera: str, stack: ExitStack):
    """The collector exists only when campaigns are configured at start-up."""
    from retrofit_agent.daemon.collect.collector import Collector

    if not cfg.collect.campaigns:
        return None
    m = pipeline.bundle.manifest
    collector = Collector(cfg.collect, metrics, camera, (m.model_id, m.version))
    try:
        collector.start()
    except OSError as e:
        raise ConfigError(f"collect.store.directory: cannot use {cfg.collect.store.directory}: {e.strerror or e}") from None
    stack.callback(collector.stop)
    return collector


# --------------------------------------------------------------------------- helpers


def tail_main(argv: Sequence[str]) -> int:
    from retrofit_agent.contract.messages import TOPICS
    from retrofit_agent.daemon.tail import tail

    p = _Parser(prog=f"{PROG} tail", description="Print what a running daemon publishes.")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5556", help="daemon's PUB endpoint")
    p.add_argument("--topic", action="append", choices=TOPICS, help="topic to show (repeatable; default: all)")
    p.add_argument("--count", type=int, help="exit after this many messages")
    p.add_argument("--timeout", type=float, help="exit after this many seconds")
    p.add_argument("--json", action="store_true", help="print raw JSON payloads")
    p.add_argument("--curve-client-cert", type=Path, help="this subscriber's CURVE certificate (.key_secret)")
    p.add_argument("--curve-server-key", type=Path, help="the daemon's public CURVE certificate (.key)")
    a = p.parse_args(argv)
    if (a.curve_client_cert is None) != (a.curve_server_key is None):
        p.error("--curve-client-cert and --curve-server-key go together")
    curve = (a.curve_client_cert, a.curve_server_key) if a.curve_client_cert else None
    try:
        return tail(a.endpoint, a.topic or list(TOPICS), a.count, a.timeout, a.json, curve=curve)
    except RetrofitError as e:
        return _fail(e)


def keys_main(argv: Sequence[str]) -> int:
    from retrofit_agent.contract.signing import generate_signing_keys
    from retrofit_agent.daemon.curve import generate_curve_keys

    p = _Parser(prog=f"{PROG} keys", description="Generate CURVE certificates or Ed25519 bundle-signing keys.")
    p.add_argument("kind", choices=("curve", "signing"))
    p.add_argument("directory", type=Path)
    p.add_argument("--name", default="retrofit-agent", help="file name stem")
    a = p.parse_args(argv)
    make = generate_curve_keys if a.kind == "curve" else generate_signing_keys
    public, secret = make(a.directory, a.name)
    sys.stdout.write(f"public: {public}\nsecret: {secret}\n")
    return 0


def sign_bundle_main(argv: Sequence[str]) -> int:
    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.contract.signing import sign_bundle

    p = _Parser(prog=f"{PROG} sign-bundle", description="Sign a bundle's manifest with an Ed25519 private key.")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    a = p.parse_args(argv)
    try:
        load_bundle(a.bundle)  # never sign a bundle that does not verify
        out = sign_bundle(a.bundle, a.key)
    except RetrofitError as e:
        return _fail(e)
    except (OSError, ValueError) as e:
        return _fail(ConfigError(f"cannot sign {a.bundle} with {a.key}: {e}"))
    sys.stdout.write(f"{out}\n")
    return 0


def schema_main(argv: Sequence[str]) -> int:
    from retrofit_agent.contract.messages import json_schema_text

    p = _Parser(prog=f"{PROG} schema", description="Print the JSON Schema of published messages.")
    p.add_argument("--output", type=Path, help="write to this file instead of stdout")
    a = p.parse_args(argv)
    text = json_schema_text()
    if a.output:
        a.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def sample_clip_main(argv: Sequence[str]) -> int:
    from retrofit_agent.contract.sample import write_clip

    p = _Parser(prog=f"{PROG} sample-clip", description="Write the synthetic sample driving clip.")
    p.add_argument("output", type=Path)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--fps", type=float, default=15.0)
    a = p.parse_args(argv)
    write_clip(a.output, a.frames, a.fps)
    sys.stdout.write(f"{a.output}\n")
    return 0


SUBCOMMANDS: dict[str, Any] = {
    "tail": tail_main,
    "schema": schema_main,
    "sample-clip": sample_clip_main,
    "keys": keys_main,
    "sign-bundle": sign_bundle_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return run(argv)
