"""``retrofit-model world images|clip``: the procedural world's command line.

    retrofit-model world images --count 50000 --out runs/world --size 160x160
    retrofit-model world clip --out runs/drive.mp4 --segments "highway-clear-day-car,tunnel"

Parameters are checked here, before any rendering, and a bad one is a
:class:`ConfigError`: one line and exit code 2 from the toolchain's entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retrofit_agent.contract.errors import ConfigError

SIZE_MIN, SIZE_MAX = 64, 2048
FPS_MIN, FPS_MAX = 1.0, 60.0
SEGMENT_SECONDS_MAX = 600.0
SEED_MAX = 2**31 - 1


def parse_size(text: str) -> tuple[int, int]:
    """``"640x360"`` → (640, 360); argparse reports a malformed value in one line."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x360, got {text!r}") from None
    return w, h


def check_size(size: tuple[int, int]) -> None:
    w, h = size
    if not (SIZE_MIN <= w <= SIZE_MAX and SIZE_MIN <= h <= SIZE_MAX):
        raise ConfigError(f"--size {w}x{h}: width and height must be between {SIZE_MIN} and {SIZE_MAX} pixels")


def check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"--seed must be between 0 and {SEED_MAX} (got {seed})")


def _common(p: argparse.ArgumentParser, size: str) -> None:
    p.add_argument("--seed", type=int, default=0, help="world seed: the same seed writes the same bytes (default 0)")
    p.add_argument(
        "--size", type=parse_size, default=parse_size(size), metavar="WxH", help=f"picture size (default {size})"
    )
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="TOML",
        help="prompts file whose groups and labels the world draws (default models/prompts/automotive.toml)",
    )


def _space(path: Path | None):
    from retrofit_agent.train.world.labels import DEFAULT_PROMPTS, WorldError, load_label_space

    try:
        return load_label_space(path or DEFAULT_PROMPTS)
    except WorldError as e:
        raise ConfigError(str(e)) from None


def _run_images(args: argparse.Namespace) -> int:
    from retrofit_agent.train.world.dataset import MAX_COUNT, summary_json, write_image_set

    if not 0 < args.count <= MAX_COUNT:
        raise ConfigError(f"--count must be between 1 and {MAX_COUNT} (got {args.count})")
    if args.shard_size <= 0:
        raise ConfigError(f"--shard-size must be > 0 (got {args.shard_size})")
    check_size(args.size)
    check_seed(args.seed)
    space = _space(args.prompts)
    summary = write_image_set(args.out, args.count, args.seed, args.size, space, args.shard_size, not args.shards_only)
    sys.stdout.write(summary_json(summary) + "\n")
    sys.stdout.write(
        f"wrote {summary.count} pictures, captions.jsonl and {len(summary.shards)} shard(s) to {args.out}; "
        f"train on them with --set data.train='[\"{summary.shard_pattern}\"]'\n"
    )
    return 0


def _run_clip(args: argparse.Namespace) -> int:
    from retrofit_agent.train.world.drive import DEFAULT_PLAN, parse_plan, write_clip
    from retrofit_agent.train.world.labels import WorldError

    if not FPS_MIN <= args.fps <= FPS_MAX:
        raise ConfigError(f"--fps must be between {FPS_MIN:g} and {FPS_MAX:g} (got {args.fps:g})")
    if not 0 < args.segment_seconds <= SEGMENT_SECONDS_MAX:
        raise ConfigError(
            f"--segment-seconds must be > 0 and <= {SEGMENT_SECONDS_MAX:g} (got {args.segment_seconds:g})"
        )
    if args.out.suffix.lower() != ".mp4":
        raise ConfigError(f"--out must name an .mp4 file (got {str(args.out)!r})")
    check_size(args.size)
    check_seed(args.seed)
    space = _space(args.prompts)
    names = [n.strip() for n in args.segments.split(",")] if args.segments is not None else list(DEFAULT_PLAN)
    try:
        plan = parse_plan([n for n in names if n], space)
        clip, sidecar, n = write_clip(args.out, plan, args.seed, args.fps, args.segment_seconds, args.size, space)
    except WorldError as e:
        raise ConfigError(str(e)) from None
    sys.stdout.write(
        json.dumps(
            {
                "clip": str(clip),
                "ground_truth": str(sidecar),
                "frames": n,
                "seconds": round(n / args.fps, 2),
                "segments": [s.name for s in plan],
            }
        )
        + "\n"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``world`` with its ``images`` and ``clip`` actions to the toolchain's subcommands."""
    world = sub.add_parser(
        "world",
        help="render the procedural driving world: labelled pictures or a drive clip",
        description="Procedural driving world rendered with OpenCV from seeded scene descriptions.",
    )
    actions = world.add_subparsers(dest="world_action", required=True, metavar="ACTION")  # same parser class as world

    images = actions.add_parser(
        "images",
        help="labelled, captioned pictures + WebDataset shards",
        description="Write JPEG pictures, captions.jsonl and WebDataset shards.",
    )
    images.add_argument("--count", type=int, required=True, help="number of pictures")
    images.add_argument("--out", type=Path, required=True, help="output folder")
    images.add_argument("--shard-size", type=int, default=1000, help="pictures per tar shard (default 1000)")
    images.add_argument(
        "--shards-only", action="store_true", help="write only captions.jsonl and the shards, no loose JPEG files"
    )
    _common(images, "224x224")
    images.set_defaults(func=_run_images)

    clip = actions.add_parser(
        "clip",
        help="a drive through every label, with per-frame ground truth",
        description="Write an mp4 drive and PATH.jsonl (one ground-truth line per frame).",
    )
    clip.add_argument(
        "--out", type=Path, required=True, metavar="PATH.mp4", help="clip to write; ground truth goes to PATH.jsonl"
    )
    clip.add_argument("--fps", type=float, default=15.0, help="frames per second (default 15)")
    clip.add_argument(
        "--segments",
        default=None,
        metavar="LIST",
        help="comma-separated segment names such as 'highway-clear-day-car,tunnel,urban-night-rain-pedestrians' "
        "(default: a 9-segment drive that shows every label)",
    )
    clip.add_argument("--segment-seconds", type=float, default=8.0, help="length of each segment (default 8)")
    _common(clip, "640x360")
    clip.set_defaults(func=_run_clip)
