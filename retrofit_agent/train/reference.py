"""Builds tests/fixtures/seeded-bundle/: the seeded, UNTRAINED bundle the daemon's tests run.

(The shipped reference, models/reference/, is trained: models/build_reference.sh.)

An EfficientNet-B3 (300x300) + MLP student and a tiny open_clip teacher, both with seeded
random weights (no pretrained weights can be downloaded where this is built), taken
through the real pipeline: ONNX export with the per-cell output (10x10 cells at 300 px, so the
daemon has cells to give regions from) and parity check, static int8 quantization
calibrated on a generated clip (tests/fixtures/generated-drive.mp4), a text bank from the teacher's text tower over
models/prompts/automotive.toml, and a hash-checked manifest. Its labels mean nothing.

    python -m retrofit_agent.train.reference --out tests/fixtures/seeded-bundle
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from retrofit_agent import __version__
from retrofit_agent.contract.bundle import Quantization, load_bank
from retrofit_agent.contract.preprocess import Preprocessor
from retrofit_agent.contract.prompts import load_prompts
from retrofit_agent.contract.sample import read_clip_frames
from retrofit_agent.train.assemble import BANK_FILE, MODEL_FILE, assemble_bundle
from retrofit_agent.train.bank import write_bank
from retrofit_agent.train.export import INPUT_NAME, export_onnx, onnx_metadata, parity, student_input_spec
from retrofit_agent.train.gate import compare, enforce
from retrofit_agent.train.quantize import QuantSettings, quantize_int8
from retrofit_agent.train.student import Student
from retrofit_agent.train.teacher import Teacher

REPO = Path(__file__).resolve().parents[2]
TEACHER_NAME = "retrofit-tiny-clip"
NOTICE = (
    "UNTRAINED reference bundle: the EfficientNet-B3 student and the tiny CLIP teacher have seeded "
    "random weights, so its labels are not meaningful. It exists to run and test the pipeline. "
    "Build a real bundle by distilling from a real CLIP teacher (retrofit-model distill) and "
    "exporting it (see README, 'Building a real bundle')."
)


def build_reference(
    out: Path, prompts_file: Path, clip: Path, seed: int = 0, backbone: str = "efficientnet_b3"
) -> dict:
    torch.use_deterministic_algorithms(True)
    teacher = Teacher(TEACHER_NAME, pretrained=None, seed=seed)
    torch.manual_seed(seed)
    student = Student(backbone, embed_dim=teacher.embed_dim).eval()
    spec = student_input_spec(student)
    prompts = load_prompts(prompts_file)
    frames = read_clip_frames(clip)
    calib, held_out = frames[0::2], frames[1::2]
    fingerprint = teacher.fingerprint()
    version = f"{__version__}-reference"
    report: dict = {"backbone": backbone, "teacher": teacher.identity, "fingerprint": fingerprint}

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "student.fp32.onnx"
        meta = onnx_metadata(spec, teacher.embed_dim, teacher.identity, fingerprint, version, f"{backbone}+mlp")
        export_onnx(student, fp32, meta, dense=True)
        report["parity_max_abs_diff"] = parity(student, fp32, held_out[:8], spec)
        pre = Preprocessor(spec)
        settings = QuantSettings(method="minmax", per_channel=True)
        quantize_int8(fp32, out / MODEL_FILE, INPUT_NAME, [pre(f) for f in calib], settings)
        write_bank(out / BANK_FILE, teacher, prompts)
        gate = compare(fp32, out / MODEL_FILE, pre.batch(held_out), load_bank(out / BANK_FILE))
        enforce(gate, 0.98, 0.95, force=False)
        report.update(
            cell_grid=list(student.cell_grid),
            int8_vs_fp32_cell_mean_cosine=gate.cell_cosine,
            int8_vs_fp32_cell_min_cosine=gate.cell_min_cosine,
            int8_vs_fp32_mean_cosine=gate.mean_cosine,
            int8_vs_fp32_min_cosine=gate.min_cosine,
            int8_vs_fp32_top1_agreement=gate.top1_agreement,
        )
    quantization = Quantization(
        mode="int8_static_qdq",
        per_channel=settings.per_channel,
        calibration=f"{settings.describe(len(calib))} from the sample clip",
    )
    assemble_bundle(
        out,
        out / MODEL_FILE,
        out / BANK_FILE,
        prompts,
        name="retrofit-reference-untrained",
        version=version,
        trained=False,
        notice=NOTICE,
        quantization=quantization,
    )
    report["model_bytes"] = (out / MODEL_FILE).stat().st_size
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m retrofit_agent.train.reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "seeded-bundle")
    p.add_argument("--prompts", type=Path, default=REPO / "models" / "prompts" / "automotive.toml")
    p.add_argument("--clip", type=Path, default=REPO / "tests" / "fixtures" / "generated-drive.mp4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="efficientnet_b3")
    a = p.parse_args(argv)
    report = build_reference(a.out, a.prompts, a.clip, a.seed, a.backbone)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
