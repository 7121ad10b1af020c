"""Cost per frame and budgets of the daemon against the bare session, in one run (issue 16).

    python benchmarks/cpu_cost.py [--repeats 5] [--frames 150] [--budget-seconds 60] [--bundle DIR]

1. CPU-seconds per processed frame and throughput: the bare session (same model, threads
   and spinning) vs the daemon (a subprocess, CPU from /proc/PID/stat), alternating, median.
2. The daemon on paced 15 and 30 fps sources: its CPU share (cores) and frame age, capture
   to publish (``published_at - captured_at`` of every tags message), p50/p99.
3. ``budget.max_cpu = 0.5`` on a 30 fps source: CPU over ``--budget-seconds`` and the
   p90/p10 ratio of intervals between inferences.
4. With a bundle that has variants: the variant chosen in 5 start-ups and the tuning time.
Figures on a shared machine are noisy: compare the ratios measured here, quote medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrofit_agent.contract.bundle import load_bundle  # noqa: E402
from retrofit_agent.contract.embedder import open_session  # noqa: E402
from retrofit_agent.contract.preprocess import Preprocessor  # noqa: E402
from retrofit_agent.contract.sample import read_clip_frames, write_clip  # noqa: E402


def proc_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def iso(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def bare(bundle: Path, clip: Path, frames: int, threads: int) -> dict:
    b = load_bundle(bundle)
    pre = Preprocessor(b.manifest.model.input)
    xs = [pre(f) for f in read_clip_frames(clip, limit=30)]
    s = open_session(b.model_path, threads)
    name = b.manifest.model.input.name
    for x in xs[:3]:
        s.run(None, {name: x})
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(frames):  # inference only: decoding and preprocessing are the daemon's overhead
        s.run(None, {name: xs[i % len(xs)]})
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"cpu_per_frame_ms": cpu / frames * 1e3, "fps": frames / wall}


def daemon(
    bundle: Path,
    clip: Path,
    threads: int,
    seconds: float | None,
    frames: int | None,
    env: dict[str, str] | None = None,
    realtime: bool = False,
) -> dict:
    tmp = tempfile.mkdtemp(prefix="retrofit-cost-")
    endpoint = f"ipc://{tmp}/s.sock"
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
        "--log-level",
        "warning",
    ]
    cmd += ["--realtime"] if realtime else []
    cmd += ["--max-frames", str(frames)] if frames else []
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RETROFIT_MODEL__TUNE_BUDGET_S": "0", "RETROFIT_MODEL__SPINNING": "off", **(env or {})},
    )
    msgs, arrivals = [], []
    cpu_at_10 = t_at_10 = None
    deadline = None
    while proc.poll() is None or sub.poll(0):
        if sub.poll(100):
            msgs.append(json.loads(sub.recv_multipart()[1]))
            arrivals.append(time.monotonic())
            if len(msgs) == 10:
                cpu_at_10, t_at_10 = proc_cpu(proc.pid), time.monotonic()
                deadline = t_at_10 + seconds if seconds else None
        if deadline and time.monotonic() >= deadline:
            cpu_end, t_end, n_end = proc_cpu(proc.pid), time.monotonic(), len(msgs)
            proc.terminate()
            proc.wait()
            break
    else:
        cpu_end, t_end, n_end = None, arrivals[-1], len(msgs)
    sub.close()
    ctx.term()
    steady = msgs[10:n_end]
    out = {"fps": (len(arrivals[10:n_end]) - 1) / (arrivals[n_end - 1] - arrivals[10])}
    if cpu_end is not None and cpu_at_10 is not None and t_at_10 is not None:
        out["cores"] = (cpu_end - cpu_at_10) / (t_end - t_at_10)
        out["cpu_per_frame_ms"] = (cpu_end - cpu_at_10) / max(1, n_end - 10) * 1e3
    age = [(iso(m["published_at"]) - iso(m["captured_at"])) * 1e3 for m in steady]
    out.update(
        age_p50_ms=float(np.percentile(age, 50)),
        age_p99_ms=float(np.percentile(age, 99)),
        inference_p50_ms=float(np.median([m["latency"]["inference_ms"] for m in steady])),
    )
    # Intervals between inference starts (the daemon's own timestamps: published_at less the
    # inference and labelling time), so a slow inference on a busy machine is not read as
    # uneven pacing.
    starts = [
        iso(m["published_at"]) - (m["latency"]["inference_ms"] + m["latency"]["labelling_ms"]) / 1e3 for m in steady
    ]
    gaps = sorted(np.diff(starts))
    out["gap_p90_p10"] = gaps[int(0.9 * len(gaps))] / gaps[int(0.1 * len(gaps))]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "reference")
    p.add_argument("--variants-bundle", type=Path, default=None, help="a bundle with variants, for section 4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=20.0, help="steady-state seconds per daemon run")
    p.add_argument("--budget-seconds", type=float, default=60.0)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="retrofit-cost-clips-"))
    clips = {fps: write_clip(tmp / f"c{fps}.mp4", n_frames=90, fps=float(fps)) for fps in (15, 30)}
    print(f"bundle={a.bundle} threads={a.threads} spinning=off cpus={os.cpu_count()} repeats={a.repeats}")
    rows = []
    for i in range(a.repeats):
        b = bare(a.bundle, clips[30], 60, a.threads)
        d = daemon(a.bundle, clips[30], a.threads, a.seconds, None)
        rows.append((b, d))
        print(
            f"  run {i + 1}: bare {b['fps']:.2f} fps {b['cpu_per_frame_ms']:.1f} cpu-ms/frame; daemon "
            f"{d['fps']:.2f} fps {d['cpu_per_frame_ms']:.1f} cpu-ms/frame"
        )
    cpu_ratio = float(np.median([d["cpu_per_frame_ms"] / b["cpu_per_frame_ms"] for b, d in rows]))
    fps_ratio = float(np.median([d["fps"] / b["fps"] for b, d in rows]))
    print(
        f"CPU per frame daemon/bare {cpu_ratio:.3f} (goal <= 1.05); throughput daemon/bare {fps_ratio:.3f} "
        "(goal >= 0.97)"
    )
    for fps in (15, 30):
        d = daemon(a.bundle, clips[fps], a.threads, a.seconds, None, realtime=True)
        print(
            f"paced {fps} fps: {d['fps']:.1f} fps processed, {d['cores']:.2f} cores, frame age p50 "
            f"{d['age_p50_ms']:.1f} ms p99 {d['age_p99_ms']:.1f} ms, inference p50 {d['inference_p50_ms']:.1f} ms"
        )
    d = daemon(
        a.bundle, clips[30], a.threads, a.budget_seconds, None, env={"RETROFIT_BUDGET__MAX_CPU": "0.5"}, realtime=True
    )
    print(
        f"budget.max_cpu=0.5 on 30 fps over {a.budget_seconds:.0f} s: {d['cores']:.3f} cores (goal 0.5 +- 0.05), "
        f"{d['fps']:.2f} fps, interval p90/p10 {d['gap_p90_p10']:.2f} (goal <= 1.5)"
    )
    if a.variants_bundle:
        for i in range(5):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "retrofit_agent",
                    "--camera",
                    str(clips[15]),
                    "--bundle",
                    str(a.variants_bundle),
                    "--publish",
                    f"ipc://{tmp}/v.sock",
                    "--no-metrics",
                    "--max-frames",
                    "1",
                    "--log-format",
                    "json",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            tuned = next(
                json.loads(line)
                for line in out.stdout.splitlines() + out.stderr.splitlines()
                if '"model_tuned"' in line
            )
            print(
                f"start-up {i + 1}: chose {tuned['variant']}/{tuned['threads']}t/spin={tuned['spinning']} in "
                f"{tuned['seconds']:.2f} s; trials {tuned['trials']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
