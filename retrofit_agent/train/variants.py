"""More than one encoder in a bundle: int8 and fp32 (``retrofit-model bundle --variants int8,fp32``).

Every variant maps images into the same embedding space with the same input and bank; only
precision and speed differ, and which is faster depends on the car's CPU (int8 needs VNNI
or dot-product instructions to win), so the daemon times them at start-up
(``daemon/variants.py``). Each variant's agreement with fp32 is measured here by the
quality gate and recorded in the manifest; a variant below the gate is refused.

fp16 is not offered: onnxruntime's CPU provider has no fp16 kernels for most of these
operators and inserts casts around them, so on a car's CPU it is slower than fp32.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from retrofit_agent.contract.bundle import Agreement, Quantization, TextBank, VariantSpec
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.train.gate import compare, enforce

MB = 1024**2
KNOWN = ("int8", "fp32")
SIZE_GOALS = {"int8": 15 * MB, "fp32": 60 * MB}  # bytes of the ONNX file


def parse_variants(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(f"--variants: give a comma list of distinct {', '.join(KNOWN)}, got {text!r}")
    return names


def variant_file(name: str) -> str:
    return f"student.{name}.onnx"


def build_variants(
    out: Path,
    models: dict[str, Path],
    quantization: dict[str, Quantization],
    held_out: np.ndarray,
    bank: TextBank,
    gate: tuple[float, float] = (0.98, 0.95),
) -> list[VariantSpec]:
    """Copy each model into ``out`` and gate it against fp32; in the order given (the first is the default)."""
    if "fp32" not in models:
        raise ConfigError("--variants: the gate compares with fp32, so give --fp32 (the exported float model)")
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, src in models.items():
        dst = out / variant_file(name)
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        if name == "fp32":
            agreement = Agreement(mean_cosine=1.0, min_cosine=1.0, top1_agreement=1.0, images=len(held_out))
        else:
            report = compare(models["fp32"], dst, held_out, bank, *gate)
            enforce(report, *gate, force=False)
            agreement = Agreement(
                mean_cosine=min(1.0, report.mean_cosine),
                min_cosine=min(1.0, report.min_cosine),
                top1_agreement=report.top1_agreement,
                images=report.images,
            )
        specs.append(
            VariantSpec(
                name=name, file=dst.name, quantization=quantization[name], agreement=agreement, bytes=dst.stat().st_size
            )
        )
    return specs


def size_lines(specs: list[VariantSpec]) -> list[str]:
    """One line per variant: its size against its goal."""
    lines = []
    for v in specs:
        goal = SIZE_GOALS.get(v.name)
        verdict = "" if goal is None else f" (goal <= {goal / MB:.0f} MB: {'met' if v.bytes <= goal else 'NOT met'})"
        lines.append(
            f"variant {v.name}: {v.file} {v.bytes / MB:.1f} MB{verdict}, agreement with fp32 "
            f"cosine {v.agreement.mean_cosine:.4f}, top-1 {v.agreement.top1_agreement:.1%}"
        )
    return lines
