"""Soak: the daemon at full speed on a looping clip with a subscriber attached.

CI runs a short version (60 s). The full run from the issue is documented in the README:

    SOAK_SECONDS=600 .venv/bin/python -m pytest tests/test_soak.py -s
"""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
WARMUP = min(15.0, SECONDS / 4)


def proc_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(l.split()[1]) for l in status if l.startswith("VmRSS:")) / 1024
    return {"rss_mb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": len(os.listdir(f"/proc/{pid}/task"))}


def test_soak(start_agent, clip, seeded_bundle, tmp_path):
    agent = start_agent(
        "--camera", str(clip), "--loop", "--bundle", str(seeded_bundle), "--threads", "2", "--log-level", "warning"
    )
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"tags")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(agent.endpoint)
    agent.wait_ready()
    arrivals: list[tuple[float, float, int]] = []  # (receive time, end-to-end ms, seq)
    stop = threading.Event()

    def read():
        import json

        while not stop.is_set():
            if sub.poll(200):
                m = json.loads(sub.recv_multipart()[1])
                arrivals.append((time.monotonic(), m["latency"]["end_to_end_ms"], m["seq"]))

    reader = threading.Thread(target=read)
    reader.start()
    t0 = time.monotonic()
    time.sleep(WARMUP)
    start = proc_stats(agent.proc.pid)
    samples = [start]
    while time.monotonic() - t0 < SECONDS:
        time.sleep(min(10.0, SECONDS / 6))
        samples.append(proc_stats(agent.proc.pid))
    stop.set()
    reader.join()
    sub.close()
    ctx.term()
    assert agent.stop() == 0
    end = samples[-1]

    window = min(60.0, (SECONDS - WARMUP) / 3)
    first = [e for t, e, _ in arrivals if t0 + WARMUP <= t < t0 + WARMUP + window]
    last = [e for t, e, _ in arrivals if t >= t0 + SECONDS - window]
    p99_first, p99_last = np.percentile(first, 99), np.percentile(last, 99)
    seqs = [s for _, _, s in arrivals]
    print(
        f"\nsoak {SECONDS:.0f}s: frames={len(arrivals)} rss {start['rss_mb']:.1f}->{end['rss_mb']:.1f} MB "
        f"fds {start['fds']}->{end['fds']} threads {start['threads']}->{end['threads']} "
        f"p99 e2e first {window:.0f}s {p99_first:.1f} ms, last {window:.0f}s {p99_last:.1f} ms"
    )
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no message lost to the attached subscriber"
    assert end["rss_mb"] - start["rss_mb"] < 10, samples
    # Growth, not a one-off: a thread a library starts once after warm-up (seen once in CI:
    # 12 -> 13, then flat for 45 s) is not a leak; a leak keeps climbing into the second half.
    settled = samples[: len(samples) // 2 + 1]
    assert end["fds"] <= max(s["fds"] for s in settled), samples
    assert end["threads"] <= max(s["threads"] for s in settled), samples
    # Latency is printed above, not asserted: on a shared 2-core machine a neighbour's load moves a
    # 15 s p99 by 20 % (CI saw 69.8 -> 85.0 ms with flat RSS, fds and threads). A long run
    # (SOAK_SECONDS=3600) prints the drift; benchmarks/daemon_throughput.py measures p50/p99.
    # Asserted here is behaviour only: no loss, no growth.
