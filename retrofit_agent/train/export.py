"""Student → ONNX (fp32), with the bundle's input spec in the metadata and a parity check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from retrofit_agent.contract.bundle import InputSpec
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.preprocess import Preprocessor
from retrofit_agent.train.student import Student

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
OPSET = 17


def student_input_spec(student: Student) -> InputSpec:
    h, w = student.input_size
    return InputSpec(
        name=INPUT_NAME,
        height=h,
        width=w,
        layout="NCHW",
        dtype="float32",
        color="RGB",
        mean=student.mean,
        std=student.std,
        resize="stretch",
        interpolation="area",
    )


def export_onnx(student: Student, path: Path, metadata: dict[str, str]) -> Path:
    """Export with a dynamic batch dimension, then run onnx.checker's full check."""
    student = student.eval()
    h, w = student.input_size
    dummy = torch.zeros(1, 3, h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            student,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "retrofit-agent"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def onnx_metadata(
    spec: InputSpec, embed_dim: int, teacher: str, fingerprint: str, version: str, architecture: str = "unknown"
) -> dict[str, str]:
    return {
        "retrofit.architecture": architecture,
        "retrofit.input_spec": json.dumps(spec.model_dump(mode="json"), sort_keys=True),
        "retrofit.embedding_dim": str(embed_dim),
        "retrofit.teacher": teacher,
        "retrofit.fingerprint": fingerprint,
        "retrofit.version": version,
    }


def parity(student: Student, onnx_path: Path, frames: list[np.ndarray], spec: InputSpec) -> float:
    """Max |torch − onnxruntime fp32| over the normalised embeddings of real frames."""
    x = Preprocessor(spec).batch(frames)
    with torch.no_grad():
        ref = student.eval()(torch.from_numpy(x).to(next(student.parameters()).device)).cpu().numpy()
    out = Embedder.from_onnx(onnx_path).embed_batch(x)  # the camera's own runtime path
    return float(np.abs(ref - out).max())
