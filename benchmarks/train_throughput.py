"""Distillation throughput (images/s) and peak memory on this machine.

For the tiny configuration (micro CLIP teacher, test_efficientnet at 32 px) and the
default one (ViT-L/14 teacher, EfficientNet-B3 at 300 px; seeded weights, since nothing
can be downloaded here; speed does not depend on the weights), with and without the
teacher embedding cache and with and without gradient checkpointing. All four variants
use the same losses (embedding + affinity: what the cache supports), so the ratios are
fair. Each variant runs in its own process so its peak memory is its own.

    .venv/bin/python benchmarks/train_throughput.py                 # both, CPU
    .venv/bin/python benchmarks/train_throughput.py --only tiny --steps 20

Prints a table; never fails for being slow.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETUPS = {
    "tiny": {"config": "models/configs/tiny.toml", "batch": 64, "images": 448, "overrides": {}},
    "default": {
        "config": "models/configs/paper.toml",
        "batch": 8,
        "images": 48,
        "overrides": {"teacher": {"pretrained": "none", "seed": 0}, "student": {"pretrained": False}},
    },
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(spec: dict) -> dict:
    """One variant: build, warm up, time ``steps`` training steps."""
    import torch

    from retrofit_agent.daemon.config import deep_merge
    from retrofit_agent.train.config import load_distill_config
    from retrofit_agent.train.engine import Distiller

    overrides = deep_merge(
        spec["overrides"],
        {
            "data": {"train": [spec["images_dir"]], "val": [], "batch_size": spec["batch"], "workers": 0, "holdout": 0},
            "loss": {"pca_attention": 0, "pca_value": 0, "gl": 0, "adversarial": 0},
            "student": {"grad_checkpointing": spec["ckpt"]},
            "cache": {"enabled": spec["cache"], "batch_size": spec["batch"], "dir": spec["cache_dir"]},
            "run": {"out_dir": spec["out"], "progress": False, "device": "cpu", "precision": "fp32"},
            "optim": {"max_steps": 10_000},
        },
    )
    cfg = load_distill_config(REPO / spec["config"], overrides)
    t0 = time.monotonic()
    d = Distiller(cfg)
    setup_s = time.monotonic() - t0
    batches = d._batches()
    d.train_step(next(batches))  # warm-up: allocator, kernels
    rss_before = _rss_mib()
    t0 = time.monotonic()
    n = 0
    for _ in range(spec["steps"]):
        batch = next(batches)
        d.train_step(batch)
        d.state.step += 1
        n += len(batch["index"])
    elapsed = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "images_per_s": n / elapsed,
        "peak_rss_mib": peak,
        "rss_before_steps_mib": rss_before,
        "setup_s": setup_s,
        "threads": torch.get_num_threads(),
    }
    if d.cache is not None:
        out["teacher_images_per_s"] = d.cache.teacher_images_per_s
    return out


def run_variant(setup: str, cache: bool, ckpt: bool, steps: int, images_dir: Path, tmp: Path) -> dict:
    s = SETUPS[setup]
    spec = {
        **s,
        "cache": cache,
        "ckpt": ckpt,
        "steps": steps,
        "images_dir": str(images_dir),
        "out": str(tmp / f"{setup}-{int(cache)}-{int(ckpt)}"),
        "cache_dir": str(tmp / f"cache-{setup}"),
    }
    r = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=REPO
    )
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(SETUPS), action="append")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 20 tiny, 3 default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    from retrofit_agent.train.synthetic import write_images

    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for setup in a.only or ["tiny", "default"]:
            images = tmp / f"images-{setup}"
            write_images(images, SETUPS[setup]["images"], seed=0, size=(240, 320) if setup == "default" else (72, 96))
            steps = a.steps or (20 if setup == "tiny" else 3)
            for cache in (False, True):
                for ckpt in (False, True):
                    res = run_variant(setup, cache, ckpt, steps, images, tmp)
                    rows.append((setup, cache, ckpt, res))
                    print(f"  {setup:8s} cache={cache!s:5s} ckpt={ckpt!s:5s} {json.dumps(res)}", file=sys.stderr)
    print(
        f"\n{'setup':8s} {'batch':>5s} {'cache':>5s} {'ckpt':>5s} {'img/s':>8s} {'vs live':>8s} {'peak RSS MiB':>13s} {'Δ in steps MiB':>15s}"
    )
    base: dict[str, float] = {}
    for setup, cache, ckpt, r in rows:
        if "error" in r:
            print(f"{setup:8s} {'':5s} {cache!s:>5s} {ckpt!s:>5s}  error: {r['error']}")
            continue
        if not cache and not ckpt:
            base[setup] = r["images_per_s"]
        ratio = r["images_per_s"] / base[setup] if setup in base else float("nan")
        print(
            f"{setup:8s} {SETUPS[setup]['batch']:5d} {cache!s:>5s} {ckpt!s:>5s} {r['images_per_s']:8.1f} {ratio:7.2f}x "
            f"{r['peak_rss_mib']:13.0f} {r['peak_rss_mib'] - r['rss_before_steps_mib']:15.0f}"
        )
    for setup, cache, ckpt, r in rows:
        if cache and not ckpt and r.get("teacher_images_per_s"):
            print(f"{setup}: teacher alone (cache build) {r['teacher_images_per_s']:.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
