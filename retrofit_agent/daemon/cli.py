"""Command line and composition root.

``retrofit-agent [run] [flags]`` runs the daemon; the other subcommands (``SUBCOMMANDS``:
tail, schema, keys, sign-bundle, sample-clip) are helpers, dispatched here by hand so that
the daemon's own flags need no subcommand. This is the only place that parses argv, reads the environment,
configures logging, installs signal handlers and wires components together.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from retrofit_agent import __version__
from retrofit_agent.contract.cliargs import positive_float, positive_int
from retrofit_agent.contract.errors import ConfigError, RetrofitError
from retrofit_agent.daemon.config import load_config

PROG = "retrofit-agent"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fail(err: RetrofitError, prog: str = PROG) -> int:
    sys.stderr.write(f"{prog}: error: {err}\n")
    return err.exit_code


# --------------------------------------------------------------------------- run


def run_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        usage="%(prog)s [run] [OPTIONS]\n       %(prog)s COMMAND [ARGS]",
        description="Real-time zero-shot image labelling on an in-car camera. Without a COMMAND (or with "
        "'run') it runs the daemon with the options below.",
        epilog=_commands_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", type=Path, help="TOML config file (default: $RETROFIT_CONFIG)")
    p.add_argument(
        "--camera",
        dest="camera.source",
        metavar="SOURCE",
        help="/dev/videoN, a device index, a video file, an rtsp/http URL or a GStreamer pipeline",
    )
    p.add_argument("--camera-id", dest="camera.id", metavar="ID", help="camera id in messages and metrics")
    p.add_argument("--loop", dest="camera.loop", action="store_true", default=None, help="loop a video file")
    p.add_argument(
        "--realtime",
        dest="camera.realtime",
        action="store_true",
        default=None,
        help="pace a video file at its frame rate, like a live camera",
    )
    p.add_argument("--bundle", dest="model.bundle", metavar="DIR", help="model bundle directory")
    p.add_argument(
        "--threads",
        dest="model.intra_op_threads",
        type=int,
        metavar="N",
        help="onnxruntime intra-op threads (0: onnxruntime's default)",
    )
    p.add_argument(
        "--publish",
        dest="publish.endpoint",
        metavar="ENDPOINT",
        help="ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5556 or ipc:///run/retrofit-agent/tags",
    )
    p.add_argument("--metrics-address", dest="metrics.address", metavar="HOST:PORT", help="Prometheus /metrics address")
    p.add_argument(
        "--no-metrics", dest="metrics.enabled", action="store_false", default=None, help="do not serve /metrics"
    )
    p.add_argument("--max-frames", dest="max_frames", type=int, metavar="N", help="stop after N processed frames")
    p.add_argument(
        "--log-format",
        dest="log.format",
        choices=("auto", "json", "console"),
        help="log lines on stderr: console for a terminal, json lines otherwise (auto, the default)",
    )
    p.add_argument(
        "--log-level",
        dest="log.level",
        choices=("debug", "info", "warning", "error"),
        help="minimum log level (default: info)",
    )
    return p


def _commands_epilog() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"  {name:{width}}  {cmd.help}" for name, cmd in SUBCOMMANDS.items()]
    return "commands:\n" + "\n".join(lines) + f"\n\n'{PROG} COMMAND --help' shows a command's options."


def run(argv: Sequence[str], environ: dict[str, str] | None = None) -> int:
    args = vars(run_parser().parse_args(argv))
    config_file = args.pop("config")
    environ = dict(os.environ) if environ is None else environ
    try:
        cfg = load_config(config_file, environ, args)
    except RetrofitError as e:
        return _fail(e)
    from retrofit_agent.contract.logs import configure_logging
    from retrofit_agent.daemon.native_logs import NativeStderr

    # OpenCV/FFmpeg write to fd 2 from C: route that into structured events, and our own
    # logs to a copy of the original stderr.
    native = NativeStderr()
    configure_logging(cfg.log.format, cfg.log.level, native.start(debug=cfg.log.level == "debug"))
    try:
        # SIGHUP re-reads the same sources: the file (changed on disk), environment and flags.
        from retrofit_agent.daemon.app import run_daemon

        return run_daemon(cfg, lambda: load_config(config_file, environ, args))
    except RetrofitError as e:
        return _fail(e)
    finally:
        native.stop()


# --------------------------------------------------------------------------- helpers


def tail_parser() -> argparse.ArgumentParser:
    from retrofit_agent.contract.messages import TOPICS

    p = _Parser(
        prog=f"{PROG} tail",
        description="Print what a running daemon publishes. Says on stderr what "
        "it waits for, and once if nothing arrives within 5 s.",
    )
    p.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:5556",
        help="the daemon's PUB endpoint (its publish.endpoint; default: %(default)s)",
    )
    p.add_argument("--topic", action="append", choices=TOPICS, help="topic to show (repeatable; default: all)")
    p.add_argument("--count", type=positive_int, help="exit 0 after this many messages")
    p.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        help="exit 1 with a one-line reason after this many seconds",
    )
    p.add_argument("--json", action="store_true", help="print raw JSON payloads")
    p.add_argument(
        "--summary",
        action="store_true",
        help="at exit, print per group how many frames each label was the top label and a tag",
    )
    p.add_argument(
        "--legend",
        type=Path,
        metavar="BUNDLE",
        help="first print what this bundle is (trained or not, its labels) and how to read the lines",
    )
    p.add_argument("--curve-client-cert", type=Path, help="this subscriber's CURVE certificate (.key_secret)")
    p.add_argument("--curve-server-key", type=Path, help="the daemon's public CURVE certificate (.key)")
    return p


def tail_main(argv: Sequence[str]) -> int:
    import signal

    from retrofit_agent.contract.messages import TOPICS
    from retrofit_agent.daemon.tail import TailOptions, tail

    p = tail_parser()
    a = p.parse_args(argv)
    if (a.curve_client_cert is None) != (a.curve_server_key is None):
        p.error("--curve-client-cert and --curve-server-key go together")
    curve = (a.curve_client_cert, a.curve_server_key) if a.curve_client_cert else None
    opts = TailOptions(a.endpoint, tuple(a.topic or TOPICS), a.count, a.timeout, a.json, curve, summary=a.summary)
    if a.legend is not None:
        from retrofit_agent.contract.bundle import read_manifest
        from retrofit_agent.daemon.tail import legend

        try:
            sys.stdout.write("\n".join(legend(read_manifest(a.legend), a.legend)) + "\n\n")
        except RetrofitError as e:
            return _fail(e, p.prog)
        sys.stdout.flush()

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` ends it like Ctrl-C: the summary still prints
    try:
        return tail(opts)
    except RetrofitError as e:
        return _fail(e, p.prog)


def keys_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} keys",
        description="Generate CURVE certificates or Ed25519 bundle-signing keys. Existing key files are never "
        "replaced without --force; secret files are created with mode 0600 and moved into place atomically. "
        "Prints the public key's fingerprint: 'sha256:' and the first 16 hex digits of the sha256 of the raw "
        "32-byte public key.",
    )
    p.add_argument(
        "kind",
        choices=("curve", "signing"),
        help="curve: NAME.key + NAME.key_secret (ZeroMQ CURVE); signing: NAME.ed25519.pub.pem + "
        "NAME.ed25519.pem (bundle signatures)",
    )
    p.add_argument("directory", type=Path, help="where to write the key files (created if missing)")
    p.add_argument(
        "--name",
        default="retrofit-agent",
        type=_key_name,
        help="file name stem: letters, digits, '.', '_', '-' (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="replace existing key files")
    return p


def _key_name(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '_' or '-', got {text!r}")
    return text


def keys_main(argv: Sequence[str]) -> int:
    from retrofit_agent.contract.signing import generate_signing_keys
    from retrofit_agent.daemon.curve import generate_curve_keys

    p = keys_parser()
    a = p.parse_args(argv)
    make = generate_curve_keys if a.kind == "curve" else generate_signing_keys
    try:
        public, secret, fingerprint = make(a.directory, a.name, force=a.force)
    except RetrofitError as e:
        return _fail(e, p.prog)
    sys.stdout.write(f"public: {public}\nsecret: {secret}\nfingerprint: {fingerprint}\n")
    return 0


def sign_bundle_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} sign-bundle",
        description="Sign a bundle's manifest with an Ed25519 private key "
        "(writes manifest.json.sig); a bundle that does not verify is refused.",
    )
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM, from 'keys signing')")
    return p


def sign_bundle_main(argv: Sequence[str]) -> int:
    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.contract.signing import sign_bundle

    p = sign_bundle_parser()
    a = p.parse_args(argv)
    try:
        load_bundle(a.bundle)  # never sign a bundle that does not verify
        out = sign_bundle(a.bundle, a.key)
    except RetrofitError as e:
        return _fail(e, p.prog)
    except (OSError, ValueError, TypeError) as e:  # unreadable, not PEM, or a passphrase-protected key
        return _fail(ConfigError(f"cannot sign {a.bundle} with {a.key}: {e}"), p.prog)
    sys.stdout.write(f"{out}\n")
    return 0


def schema_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} schema", description="Print the JSON Schema of published messages.")
    p.add_argument("--output", type=Path, help="write to this file instead of stdout")
    return p


def schema_main(argv: Sequence[str]) -> int:
    from retrofit_agent.contract.messages import json_schema_text

    p = schema_parser()
    a = p.parse_args(argv)
    text = json_schema_text()
    if not a.output:
        sys.stdout.write(text)
        return 0
    try:
        a.output.write_text(text, encoding="utf-8")
    except OSError as e:
        return _fail(ConfigError(f"--output: cannot write {a.output}: {e.strerror or e}"), p.prog)
    return 0


def sample_clip_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} sample-clip", description="Write the synthetic sample driving clip (MPEG-4).")
    p.add_argument("output", type=_video_path, help="video file to write: NAME.mp4 or NAME.avi")
    p.add_argument("--frames", type=positive_int, default=150, help="number of frames (default: %(default)s)")
    p.add_argument("--fps", type=positive_float, default=15.0, help="frame rate (default: %(default)s)")
    return p


def _video_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".mp4", ".avi"):  # what OpenCV's MPEG-4 writer takes everywhere
        raise argparse.ArgumentTypeError(f"expected a .mp4 or .avi file name, got {text!r}")
    return path


def sample_clip_main(argv: Sequence[str]) -> int:
    from retrofit_agent.contract.sample import write_clip

    p = sample_clip_parser()
    a = p.parse_args(argv)
    try:
        write_clip(a.output, a.frames, a.fps)
    except RetrofitError as e:
        return _fail(e, p.prog)
    except OSError as e:
        return _fail(ConfigError(f"cannot write {a.output}: {e.strerror or e}"), p.prog)
    sys.stdout.write(f"{a.output}\n")
    return 0


def uplink_parser() -> argparse.ArgumentParser:
    from retrofit_agent.daemon.uplink.cli import uplink_parser as parser

    return parser()


def uplink_main(argv: Sequence[str]) -> int:
    from retrofit_agent.daemon.uplink.cli import uplink_main as main

    return main(argv)


@dataclass(frozen=True)
class Subcommand:
    help: str
    parser: Callable[[], argparse.ArgumentParser]
    main: Callable[[Sequence[str]], int]


SUBCOMMANDS: dict[str, Subcommand] = {
    "run": Subcommand("run the daemon (the default when no command is given)", run_parser, lambda argv: run(argv)),
    "tail": Subcommand("print what a running daemon publishes", tail_parser, tail_main),
    "schema": Subcommand("print the JSON Schema of published messages", schema_parser, schema_main),
    "sample-clip": Subcommand("write the synthetic sample driving clip", sample_clip_parser, sample_clip_main),
    "keys": Subcommand("generate CURVE certificates or Ed25519 bundle-signing keys", keys_parser, keys_main),
    "sign-bundle": Subcommand("sign a bundle's manifest with an Ed25519 key", sign_bundle_parser, sign_bundle_main),
    "uplink": Subcommand("forward messages and captures off the vehicle (MQTT, S3)", uplink_parser, uplink_main),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]].main(argv[1:])
    if argv and not argv[0].startswith("-"):
        sys.stderr.write(
            f"{PROG}: error: unknown command {argv[0]!r} (commands: {', '.join(SUBCOMMANDS)}; see --help)\n"
        )
        return 2
    return run(argv)
