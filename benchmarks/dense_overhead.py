"""What the second output (per-cell embeddings, for regions) costs: inference p50 with and
without it, one run, same student, same input, same session options as the camera.

    python benchmarks/dense_overhead.py [--runs 60] [--size 300] [--threads 1 2]

One seeded EfficientNet-B3 + MLP student (latency depends on the architecture, not the
weights) is exported twice, with and without ``cell_embeddings``, and both are quantized to
int8 the way the toolchain does it (calibrated on the sample clip). The four sessions are
timed in interleaved rounds (so a neighbour's load falls on all of them alike) at each
thread count; the figure is the ratio of medians, dense / pooled-only. The regions stage
itself (cells scored and joined into boxes, numpy on the loop thread) is timed too, on the
int8 model's real cells with K = 4 localized labels. The issue's goal: at most +5 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrofit_agent.contract.embedder import Embedder  # noqa: E402
from retrofit_agent.contract.preprocess import Preprocessor  # noqa: E402
from retrofit_agent.contract.sample import read_clip_frames  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=60, help="timed rounds per session and thread count")
    p.add_argument("--size", type=int, default=300, help="input side in pixels (the paper's 300)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--clip", type=Path, default=REPO / "models" / "sample" / "drive.mp4")
    a = p.parse_args()

    import torch

    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.contract.regions import RegionFinder
    from retrofit_agent.train.export import export_onnx, onnx_metadata, student_input_spec
    from retrofit_agent.train.quantize import QuantSettings, quantize_int8
    from retrofit_agent.train.student import Student

    bundle = load_bundle(REPO / "models" / "reference")  # its bank scores the cells of the regions stage
    dim = int(bundle.bank.embeddings.shape[1])
    torch.manual_seed(0)
    student = Student("efficientnet_b3", embed_dim=dim, input_size=a.size).eval()
    spec = student_input_spec(student)
    frames = read_clip_frames(a.clip)
    pre = Preprocessor(spec)
    calib = [pre(f) for f in frames[:32]]
    x = pre(frames[len(frames) // 2])
    models: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dense in (False, True):
            name = "dense" if dense else "pooled"
            meta = onnx_metadata(spec, dim, "bench", "0" * 16, "bench", "efficientnet_b3+mlp")
            fp32 = export_onnx(student, Path(tmp) / f"{name}.fp32.onnx", meta, dense=dense)
            models[f"{name} fp32"] = fp32
            models[f"{name} int8"] = quantize_int8(
                fp32, Path(tmp) / f"{name}.int8.onnx", "image", calib, QuantSettings(method="minmax", per_channel=True)
            )
        print(f"EfficientNet-B3 + MLP at {a.size}x{a.size}, seeded; {a.runs} interleaved rounds; p50 ms")
        print(f"{'threads':>8}" + "".join(f"{m:>14}" for m in models) + f"{'fp32 ratio':>12}{'int8 ratio':>12}")
        for threads in a.threads:
            embedders = {m: Embedder.from_onnx(path, intra_op_threads=threads) for m, path in models.items()}
            run = {
                m: (e.embed_with_cells if e.has_cells else e.embed)  # what the daemon calls
                for m, e in embedders.items()
            }
            for f in run.values():  # warm-up
                for _ in range(3):
                    f(x)
            times: dict[str, list[float]] = {m: [] for m in run}
            for _ in range(a.runs):
                for m, f in run.items():
                    t0 = time.perf_counter()
                    f(x)
                    times[m].append((time.perf_counter() - t0) * 1e3)
            p50 = {m: float(np.median(t)) for m, t in times.items()}
            print(
                f"{threads:>8}"
                + "".join(f"{p50[m]:>14.1f}" for m in models)
                + f"{p50['dense fp32'] / p50['pooled fp32']:>12.3f}{p50['dense int8'] / p50['pooled int8']:>12.3f}"
            )
        # The regions stage on real int8 cells: K = 4 localized labels of the reference bank.
        dense = Embedder.from_onnx(models["dense int8"], intra_op_threads=1)
        _, cells = dense.embed_with_cells(x)
        assert cells is not None
        keys = [f"{g.name}.{lab.name}" for g in bundle.manifest.bank.groups for lab in g.labels if not lab.negative][:4]
        finder = RegionFinder(bundle.bank, bundle.manifest.bank, spec, threshold=0.0, max_labels=4, labels=keys)
        stage = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            finder(cells, keys, (720, 1280))
            stage.append((time.perf_counter() - t0) * 1e3)
        print(
            f"regions stage ({cells.shape[0]}x{cells.shape[1]} cells, K=4, threshold 0: every cell in a box): "
            f"p50 {np.median(stage):.3f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
