"""Two-process DistributedDataParallel on CPU (gloo), launched with torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from train_helpers import REPO, images  # noqa: E402,F401  (images is a fixture)

pytestmark = [pytest.mark.train, pytest.mark.slow, pytest.mark.integration]


def test_two_gloo_ranks_complete_and_agree_on_the_weights(tmp_path: Path, images: Path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).parent / "ddp_worker.py"),
        str(images),
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = torch.load(out / "rank-0.pt"), torch.load(out / "rank-1.pt")
    assert a.keys() == b.keys() and any(k.startswith("projectors.") for k in a)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"[ddp] largest weight/buffer difference between ranks: {worst:.3g}")
    assert worst == 0.0  # parameters stay equal through DDP; BN buffers are synced at the end
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["kind"] == "train"]
    assert [l["step"] for l in train] == list(range(1, 7))
    # 256 training images, 16 per rank per step: an epoch is 8 steps of 32 images.
    assert train[0]["epoch"] == pytest.approx(1 / 8)
    start = torch.load(out / "checkpoints" / "step-00000006" / "state.pt", weights_only=False)
    assert start["world"] == 2 and (out / "checkpoints" / "step-00000006" / "rng-rank1.pt").exists()
