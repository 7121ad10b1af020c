"""Daemon vs bare onnxruntime session on the reference bundle, in one run.

    python benchmarks/daemon_throughput.py [--frames 300] [--threads 2]

Baseline: the bare session running the same model on preprocessed frames with the same
thread settings. Then the real daemon (a subprocess) processes the sample clip as fast
as it can while a ZeroMQ subscriber receives every tags message. Prints per-frame
latency p50/p99, throughput, their ratio, start-up to first tag and peak RSS against the
goals. Figures on a shared machine are noisy: compare ratios, quote medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrofit_agent.contract.bundle import load_bundle  # noqa: E402
from retrofit_agent.contract.embedder import open_session  # noqa: E402
from retrofit_agent.contract.preprocess import Preprocessor  # noqa: E402
from retrofit_agent.contract.sample import read_clip_frames  # noqa: E402

GOALS = {"throughput_ratio": 0.95, "fps": 35.0, "startup_s": 3.0, "rss_mb": 250.0}


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench_session(bundle: Path, clip: Path, frames: int, threads: int) -> dict:
    b = load_bundle(bundle)
    spec = b.manifest.model
    pre = Preprocessor(spec.input)
    tensors = [pre(f) for f in read_clip_frames(clip, limit=50)]
    sess = open_session(b.model_path, threads)
    feed = spec.input.name
    for t in tensors[:5]:
        sess.run(None, {feed: t})
    lat = []
    t0 = time.perf_counter()
    for i in range(frames):
        s = time.perf_counter()
        sess.run(None, {feed: tensors[i % len(tensors)]})
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    return {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "fps": frames / wall}


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def bench_daemon(bundle: Path, clip: Path, frames: int, threads: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="retrofit-bench-")
    endpoint = f"ipc://{tmp}/bench.sock"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"tags")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(endpoint)
    cmd = [
        sys.executable,
        "-m",
        "retrofit_agent",
        "--camera",
        str(clip),
        "--loop",
        "--bundle",
        str(bundle),
        "--threads",
        str(threads),
        "--publish",
        endpoint,
        "--no-metrics",
        "--max-frames",
        str(frames),
        "--log-level",
        "warning",
    ]
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    msgs, arrivals, rss = [], [], 0.0
    while proc.poll() is None or sub.poll(0):
        if sub.poll(200):
            msgs.append(json.loads(sub.recv_multipart()[1]))
            arrivals.append(time.monotonic())
        if len(msgs) % 25 == 0:
            rss = max(rss, peak_rss_mb(proc.pid))
    err = proc.stderr.read()
    sub.close()
    ctx.term()
    if proc.returncode != 0 or not msgs:
        raise SystemExit(f"daemon failed ({proc.returncode}): {err[-2000:]}")
    # Throughput over the steady state: skip the first 10 messages (warm caches, subscriber join).
    steady = arrivals[10:]
    fps = (len(steady) - 1) / (steady[-1] - steady[0])
    e2e = [m["latency"]["end_to_end_ms"] for m in msgs[10:]]
    inf = [m["latency"]["inference_ms"] for m in msgs[10:]]
    seqs = [m["seq"] for m in msgs]
    return {
        "p50_ms": pct(e2e, 50),
        "p99_ms": pct(e2e, 99),
        "inference_p50_ms": pct(inf, 50),
        "fps": fps,
        "startup_to_first_tag_s": arrivals[0] - t_start,
        "peak_rss_mb": rss,
        "received": len(msgs),
        "seq_gaps": int(sum(b - a - 1 for a, b in zip(seqs, seqs[1:]))),
    }


def median_of(runs: list[dict]) -> dict:
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "reference")
    p.add_argument("--clip", type=Path, default=REPO / "models" / "sample" / "drive.mp4")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="alternating bare/daemon runs; medians are reported")
    a = p.parse_args()
    print(f"bundle={a.bundle} frames={a.frames} intra_op_threads={a.threads} cpus={os.cpu_count()} repeats={a.repeats}")
    bare_runs, daemon_runs = [], []
    for i in range(a.repeats):
        bare_runs.append(bench_session(a.bundle, a.clip, a.frames, a.threads))
        daemon_runs.append(bench_daemon(a.bundle, a.clip, a.frames, a.threads))
        ratio_i = daemon_runs[-1]["fps"] / bare_runs[-1]["fps"]
        print(
            f"  run {i + 1}: bare {bare_runs[-1]['fps']:.2f} fps, daemon {daemon_runs[-1]['fps']:.2f} fps, ratio {ratio_i:.3f}"
        )
    bare, daemon = median_of(bare_runs), median_of(daemon_runs)
    ratio = float(np.median([d["fps"] / b["fps"] for b, d in zip(bare_runs, daemon_runs)]))
    print(f"medians over {a.repeats} runs")
    print(f"{'':22}{'p50 ms':>10}{'p99 ms':>10}{'frames/s':>10}")
    print(f"{'bare session':22}{bare['p50_ms']:10.1f}{bare['p99_ms']:10.1f}{bare['fps']:10.1f}")
    print(f"{'daemon (end-to-end)':22}{daemon['p50_ms']:10.1f}{daemon['p99_ms']:10.1f}{daemon['fps']:10.1f}")
    print(
        f"daemon inference p50 {daemon['inference_p50_ms']:.1f} ms; seq gaps {int(daemon['seq_gaps'])}. End-to-end "
        "includes the time a read-ahead frame waits while the previous one is inferred."
    )
    checks = [
        ("throughput daemon/bare", ratio, f">= {GOALS['throughput_ratio']}", ratio >= GOALS["throughput_ratio"]),
        ("daemon frames/s", daemon["fps"], f">= {GOALS['fps']}", daemon["fps"] >= GOALS["fps"]),
        (
            "start-up to first tag s",
            daemon["startup_to_first_tag_s"],
            f"<= {GOALS['startup_s']}",
            daemon["startup_to_first_tag_s"] <= GOALS["startup_s"],
        ),
        ("peak RSS MB", daemon["peak_rss_mb"], f"<= {GOALS['rss_mb']}", daemon["peak_rss_mb"] <= GOALS["rss_mb"]),
    ]
    for name, value, goal, ok in checks:
        print(f"{name:26}{value:10.2f}  goal {goal:8}  {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
