"""Batch-1 latency and size of image encoders with onnxruntime, in one run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrofit_agent.inference import open_session
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
            _ImageTower(teacher).eval(), (torch.zeros(1, 3, size, size),), str(path), input_names=["image"],
            output_names=["embedding"], opset_version=17, dynamo=False, do_constant_folding=True,
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


def time_session(path: Path, shape: tuple[int, ...], threads: int, runs: int, warmup: int = 3) -> tuple[float, float]:
    sess = open_session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
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
