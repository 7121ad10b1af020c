"""Teacher image tower vs student fp32 vs student int8: batch-1 latency and size, one run.

    python benchmarks/model_bench.py [--teacher ViT-L-14] [--runs 20]

The teacher is the paper's ViT-L/14 architecture with seeded random weights (no download
here): latency and size depend on the architecture, not on the weights. The students are
the reference bundle's int8 model and its fp32 export rebuilt from the same seed.
Prints p50/p99 at 1 thread and at all cores, sizes, the ratios, and the paper's figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from retrofit_agent.bundle import load_bundle  # noqa: E402
from retrofit_agent.train.bench import bench, export_teacher_image_tower  # noqa: E402
from retrofit_agent.train.export import export_onnx  # noqa: E402
from retrofit_agent.train.student import Student  # noqa: E402
from retrofit_agent.train.teacher import Teacher  # noqa: E402

PAPER = "paper: ~35 ms per 300x300 frame on the camera; ~25 MB student vs 1.2 GB CLIP ViT-L/14"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="ViT-L-14")
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "reference")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--teacher-runs", type=int, default=8)
    a = p.parse_args()
    b = load_bundle(a.bundle)
    h, w = b.manifest.model.input.height, b.manifest.model.input.width
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        student = Student("efficientnet_b3", embed_dim=b.manifest.model.output.embedding_dim).eval()
        export_onnx(student, tmp / "student.fp32.onnx", {})
        del student
        teacher = Teacher(a.teacher, pretrained=None, seed=0)
        size = teacher.image_size
        print(f"exporting {a.teacher} image tower (seeded weights; latency and size depend on the architecture)")
        export_teacher_image_tower(teacher, tmp / "teacher.onnx")
        del teacher
        rows = bench({
            f"teacher {a.teacher} fp32": (tmp / "teacher.onnx", (1, 3, size, size), a.teacher_runs),
            "student fp32": (tmp / "student.fp32.onnx", (1, 3, h, w), a.runs),
            "student int8": (b.model_path, (1, 3, h, w), a.runs),
        })
    print(f"{'model':28}{'threads':>8}{'p50 ms':>10}{'p99 ms':>10}{'size MB':>10}")
    for r in rows:
        print(f"{r.model:28}{r.threads:>8}{r.p50_ms:>10.1f}{r.p99_ms:>10.1f}{r.size_mb:>10.1f}")
    by = {(r.model.split()[0] + " " + r.model.split()[-1], r.threads): r for r in rows}
    teacher_key = f"teacher fp32"
    for t in sorted({r.threads for r in rows}):
        tch, f32, i8 = by[(teacher_key, t)], by[("student fp32", t)], by[("student int8", t)]
        print(f"{t} thread(s): int8 is {tch.p50_ms / i8.p50_ms:.1f}x faster than the teacher (goal >= 20x), "
              f"fp32/int8 latency {f32.p50_ms / i8.p50_ms:.2f} (goal >= 1 at 1 thread)")
    t1 = min(r.threads for r in rows)
    print(f"size: int8 {by[('student int8', t1)].size_mb:.1f} MB (goal <= 15), fp32 {by[('student fp32', t1)].size_mb:.1f} MB, "
          f"teacher image tower {by[(teacher_key, t1)].size_mb:.0f} MB; int8/teacher {by[('student int8', t1)].size_mb / by[(teacher_key, t1)].size_mb:.3f}")
    print(PAPER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
