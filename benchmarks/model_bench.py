"""Teacher image tower vs student fp32 vs student int8: batch-1 latency and size, one run.

    python benchmarks/model_bench.py [--teacher ViT-L-14] [--runs 20]
    (the same as: retrofit-model bench)

The teacher is the paper's ViT-L/14 architecture with seeded random weights (no download
here): latency and size depend on the architecture, not on the weights. The students are
the reference bundle's int8 model and its fp32 export rebuilt from the same seed.
Prints p50/p99 at 1 thread and at all cores, sizes, the ratios, and the paper's figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrofit_agent.train.bench import run_model_bench  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="ViT-L-14")
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "reference")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--teacher-runs", type=int, default=8)
    a = p.parse_args()
    run_model_bench(a.teacher, a.bundle, a.runs, a.teacher_runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
