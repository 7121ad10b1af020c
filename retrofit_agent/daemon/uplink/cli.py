"""``retrofit-agent uplink``'s command line: argv to a validated config, logging, then the
composition root (:func:`retrofit_agent.daemon.uplink.app.run_uplink`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from retrofit_agent.contract.errors import RetrofitError

PROG = "retrofit-agent uplink"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def uplink_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Forward the daemon's messages to an MQTT broker through a durable on-vehicle journal, and "
        "upload its captures to an S3-compatible store. Settings also come from --config (TOML) and "
        "RETROFIT_UPLINK_<SECTION>__<KEY> environment variables; flags win.",
    )
    p.add_argument("--config", type=Path, help="TOML config file (default: $RETROFIT_UPLINK_CONFIG)")
    p.add_argument(
        "--endpoint",
        dest="input.endpoint",
        metavar="ENDPOINT",
        help="the daemon's ZeroMQ PUB endpoint, e.g. ipc:///run/retrofit-agent/messages",
    )
    p.add_argument("--mqtt", dest="mqtt.url", metavar="URL", help="broker: mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--journal", dest="journal.directory", metavar="DIR", help="journal directory")
    p.add_argument("--vehicle", dest="vehicle", metavar="ID", help="vehicle id in topics and keys (default: host name)")
    p.add_argument(
        "--captures", dest="captures.directory", metavar="DIR", help="the daemon's capture store, to upload from"
    )
    p.add_argument(
        "--tags",
        dest="input.tags",
        choices=("all", "every_n", "changes"),
        help="which tags messages to forward (default: changes)",
    )
    p.add_argument("--metrics-address", dest="metrics.address", metavar="HOST:PORT", help="/metrics address")
    p.add_argument("--log-format", dest="log.format", choices=("auto", "json", "console"), help="log line format")
    p.add_argument(
        "--log-level", dest="log.level", choices=("debug", "info", "warning", "error"), help="minimum log level"
    )
    return p


def uplink_main(argv: Sequence[str], environ: dict[str, str] | None = None) -> int:
    from retrofit_agent.daemon.uplink.config import load_uplink_config

    p = uplink_parser()
    args = vars(p.parse_args(argv))
    config_file = args.pop("config")
    try:
        cfg = load_uplink_config(config_file, dict(os.environ) if environ is None else environ, args)
    except RetrofitError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return e.exit_code
    from retrofit_agent.contract.logs import configure_logging
    from retrofit_agent.daemon.uplink.app import run_uplink

    configure_logging(cfg.log.format, cfg.log.level)
    try:
        return run_uplink(cfg)
    except RetrofitError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return e.exit_code
