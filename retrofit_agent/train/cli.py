"""``retrofit-model``: the offboard toolchain's command line and composition root.

    retrofit-model distill --config models/configs/tiny.toml [--set optim.lr=1e-3 ...]
    torchrun --nproc_per_node 8 -m retrofit_agent.train.cli distill --config paper.toml

Each subcommand is a :class:`Command` in :data:`COMMANDS` (its arguments and its run
function), or a module's ``register(sub)`` that adds subparsers with
``set_defaults(func=...)`` (``commands.py``: export, quantize, prompts, bundle, evaluate,
cityscapes-index, bench). Config errors print one line and exit 2 before torch is imported;
so do a missing train extra and unusable paths (``main`` turns them into one line each).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from retrofit_agent import __version__
from retrofit_agent.contract.errors import ConfigError, RetrofitError

PROG = "retrofit-model"
# Top-level modules that only the train extra brings; importing one without it is a setup
# problem, not a bug, and gets one line naming the install command.
TRAIN_EXTRA_MODULES = frozenset({"torch", "torchvision", "timm", "open_clip", "onnx", "onnxscript", "tqdm"})
INSTALL_TRAIN = (
    "pip install torch==2.14.1 torchvision==0.29.1 (pinned first: the CUDA build, which also runs on "
    "a CPU), then pip install 'retrofit-agent[train]' (from a checkout: pip install -e '.[train]')"
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- distill


def add_config_arguments(p: argparse.ArgumentParser, config_help: str, example: str) -> None:
    """``--config FILE`` and repeated ``--set KEY=VALUE``, read back by :func:`overrides_from_args`."""
    p.add_argument("--config", type=Path, help=config_help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. {example}",
    )


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(
        p,
        "TOML config (see models/configs/); defaults reproduce the paper's setup",
        "--set optim.lr=1e-3 --set data.train='[\"shards/{000..009}.tar\"]'",
    )
    p.add_argument("--out", dest="run.out_dir", metavar="DIR", help="run directory (run.out_dir)")
    p.add_argument("--resume", dest="run.resume", metavar="auto|never|DIR", help="run.resume")
    p.add_argument("--max-steps", dest="optim.max_steps", type=int, metavar="N", help="optim.max_steps")
    p.add_argument("--device", dest="run.device", metavar="DEVICE", help="run.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", dest="run.progress", action="store_false", default=None, help="no progress bar")
    p.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default=argparse.SUPPRESS,
        help="as the global --log-format (also accepted here)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` items first, then the dedicated flags (already typed by argparse) on top."""
    from retrofit_agent.train.config import parse_overrides

    tree = parse_overrides(args.overrides)
    for key, value in vars(args).items():
        if "." not in key or value is None:
            continue
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _run_distill(args: argparse.Namespace) -> int:
    from retrofit_agent.contract.logs import configure_logging
    from retrofit_agent.train.config import load_distill_config

    cfg = load_distill_config(args.config, overrides_from_args(args))
    if args.print_config:
        sys.stdout.write(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
        return 0
    if not cfg.data.train:
        raise ConfigError(
            "data.train: no training images configured (set it in the config or with --set data.train=...)"
        )
    configure_logging(getattr(args, "log_format", "auto"), "info")
    # Heavy imports only now: a bad config above fails in a fraction of a second.
    from retrofit_agent.train.distributed import init_distributed, shutdown
    from retrofit_agent.train.engine import Distiller

    env = init_distributed(cfg.run.device)
    try:
        summary = Distiller(cfg, env).fit()
    finally:
        shutdown()
    if env.is_main:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        sp = summary.get("cache_speedup")
        if sp:
            sys.stdout.write(
                f"teacher cache: {sp['student_images_per_s']:.1f} images/s from the cache vs an estimated "
                f"{sp['estimated_uncached_images_per_s']:.1f} with the live teacher: {sp['speedup']:.2f}x faster\n"
            )
    return 0


# --------------------------------------------------------------------------- synth-images


def _synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder to write the images to")
    p.add_argument("--count", type=int, default=512, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated scenes")


def _run_synth(args: argparse.Namespace) -> int:
    from retrofit_agent.train.synthetic import write_images

    if args.count <= 0:
        raise ConfigError(f"--count must be > 0 (got {args.count})")
    paths = write_images(args.out, args.count, args.seed)
    sys.stdout.write(f"wrote {len(paths)} generated images to {args.out}\n")
    return 0


COMMANDS: dict[str, Command] = {
    "distill": Command("distil a CLIP teacher into a timm student", _distill_arguments, _run_distill),
    "synth-images": Command(
        "write generated scenes for smoke runs (no meaning, no labels)", _synth_arguments, _run_synth
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from retrofit_agent.train import (
        chain,
        commands,  # export, quantize, prompts, bundle, evaluate, ...
    )
    from retrofit_agent.train.teacher_train import cli as teacher_train_cli
    from retrofit_agent.train.world import cli as world_cli

    p = _Parser(
        prog=PROG,
        description="Offboard model toolchain for retrofit-agent (needs the train extra).",
        epilog=f"'{PROG} COMMAND --help' shows a command's options.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="log lines on stderr: console for a terminal, json lines otherwise (auto, the default)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser, title="commands")
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(func=cmd.run)
    commands.register(sub)  # modules that register themselves with set_defaults(func=...)
    world_cli.register(sub)  # world images / world clip (torch-free)
    teacher_train_cli.register(sub)  # teacher-train: a CLIP teacher trained on the world
    chain.register(sub)  # chain: world → teacher → student → bundle → daemon score
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from retrofit_agent.contract.logs import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, "info")
    try:
        return args.func(args)
    except RetrofitError as e:
        return _fail(e)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise  # a bug, not a setup problem: keep the traceback
        return _fail(
            ConfigError(f"'{args.command}' needs the train extra ({e.name} is not installed): {INSTALL_TRAIN}")
        )
    except OSError as e:  # a path given on the command line that cannot be read or written
        where = f"{e.filename}: " if e.filename else ""
        return _fail(ConfigError(f"{where}{e.strerror or e}"))


def _fail(err: RetrofitError) -> int:
    sys.stderr.write(f"{PROG}: error: {err}\n")
    return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
