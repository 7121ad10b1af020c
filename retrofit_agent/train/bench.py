"""Batch-1 latency and size of image encoders with onnxruntime, in one run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrofit_agent.contract.embedder import Embedder, open_session
from retrofit_agent.contract.errors import BundleError
from retrofit_agent.train.teacher import Teacher


@dataclass(frozen=True)
class BenchRow:
    model: str
    threads: int
    p50_ms: float
    p99_ms: float
    size_mb: float


class _ImageTower(torch.nn.Module):
    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.visual = teacher.model.visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.visual(x), dim=-1)


def export_teacher_image_tower(teacher: Teacher, path: Path) -> Path:
    """The teacher's image tower alone, as the daemon would have to run it without distillation."""
    size = teacher.image_size
    # nn.MultiheadAttention's inference fast path is a fused op ONNX has no symbolic for.
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad():
        torch.onnx.export(
            _ImageTower(teacher).eval(),
            (torch.zeros(1, 3, size, size),),
            str(path),
            input_names=["image"],
            output_names=["embedding"],
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
            external_data=True,
        )
    return path


def model_size_mb(path: Path) -> float:
    """The .onnx file plus any external-data files next to it that it references."""
    import onnx

    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    seen = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                total += (path.parent / entry.value).stat().st_size
    return total / 2**20


def _runner(path: Path, threads: int) -> Callable[[np.ndarray], object]:
    """A student (exported with its spec) runs through the camera's Embedder; the teacher's
    image tower, which is no bundle model, through a session with the same options."""
    try:
        return Embedder.from_onnx(path, threads).embed_batch
    except BundleError:
        sess = open_session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})


def time_session(path: Path, shape: tuple[int, ...], threads: int, runs: int, warmup: int = 3) -> tuple[float, float]:
    run = _runner(path, threads)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def bench(models: dict[str, tuple[Path, tuple[int, ...], int]], threads: list[int] | None = None) -> list[BenchRow]:
    """models: name → (onnx path, input shape, runs). Threads default to 1 and all cores."""
    threads = threads or sorted({1, os.cpu_count() or 1})
    rows = []
    for name, (path, shape, runs) in models.items():
        size = model_size_mb(path)
        for t in threads:
            p50, p99 = time_session(path, shape, t, runs)
            rows.append(BenchRow(name, t, p50, p99, size))
    return rows


PAPER = "paper: ~35 ms per 300x300 frame on the camera; ~25 MB student vs 1.2 GB CLIP ViT-L/14"


def run_model_bench(
    teacher_name: str,
    bundle_dir: Path,
    runs: int = 20,
    teacher_runs: int = 8,
    progress: Callable[[str], None] = print,
) -> list[BenchRow]:
    """Export the teacher's image tower (seeded: latency and size depend on the architecture,
    not the weights) and the student fp32 (same seed as the reference build), then time both
    beside the bundle's int8 model and print the table, ratios and the paper's figures.
    ``progress`` hears one line per stage (the whole run takes minutes)."""
    import tempfile

    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.train.export import export_onnx, onnx_metadata, student_input_spec
    from retrofit_agent.train.student import Student

    b = load_bundle(bundle_dir)
    h, w = b.manifest.model.input.height, b.manifest.model.input.width
    arch = b.manifest.model.architecture.split("+")[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        progress(f"exporting the student fp32 ({arch}, seeded: the same architecture as the bundle's)")
        torch.manual_seed(0)
        student = Student(
            arch if arch != "unknown" else "efficientnet_b3",
            embed_dim=b.manifest.model.output.embedding_dim,
            input_size=h,
        ).eval()
        meta = onnx_metadata(student_input_spec(student), student.embed_dim, "bench", "0" * 16, "bench", arch)
        export_onnx(student, tmp / "student.fp32.onnx", meta)
        del student
        progress(
            f"exporting the teacher image tower ({teacher_name}, seeded: latency and size depend on the architecture)"
        )
        teacher = Teacher(teacher_name, pretrained=None, seed=0)
        size = teacher.image_size
        export_teacher_image_tower(teacher, tmp / "teacher.onnx")
        del teacher
        models = {
            "teacher fp32": (tmp / "teacher.onnx", (1, 3, size, size), teacher_runs),
            "student fp32": (tmp / "student.fp32.onnx", (1, 3, h, w), runs),
            "student int8": (b.model_path, (1, 3, h, w), runs),
        }
        rows = []
        for name, model in models.items():
            progress(f"timing {name} ({model[2]} runs per thread count)")
            rows += bench({name: model})
    print_report(rows, teacher_name)
    return rows


def print_report(rows: list[BenchRow], teacher_name: str) -> None:
    print(f"{'model':16}{'threads':>8}{'p50 ms':>10}{'p99 ms':>10}{'size MB':>10}")
    for r in rows:
        print(f"{r.model:16}{r.threads:>8}{r.p50_ms:>10.1f}{r.p99_ms:>10.1f}{r.size_mb:>10.1f}")
    by = {(r.model, r.threads): r for r in rows}
    for t in sorted({r.threads for r in rows}):
        tch, f32, i8 = by[("teacher fp32", t)], by[("student fp32", t)], by[("student int8", t)]
        print(
            f"{t} thread(s): student int8 {tch.p50_ms / i8.p50_ms:.1f}x faster than the {teacher_name} image tower "
            f"(goal >= 20x); fp32/int8 latency ratio {f32.p50_ms / i8.p50_ms:.2f} (goal >= 1 at 1 thread)"
        )
    t1 = min(r.threads for r in rows)
    i8, f32, tch = by[("student int8", t1)], by[("student fp32", t1)], by[("teacher fp32", t1)]
    print(
        f"size: student int8 {i8.size_mb:.1f} MB (goal <= 15), fp32 {f32.size_mb:.1f} MB, teacher image tower "
        f"{tch.size_mb:.0f} MB; int8/teacher {i8.size_mb / tch.size_mb:.3f}"
    )
    print(PAPER)
