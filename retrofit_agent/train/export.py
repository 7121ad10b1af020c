"""Student → ONNX (fp32), with the bundle's input spec in the metadata and a parity check.

With ``dense=True`` the graph has a second output, ``cell_embeddings`` (N, H', W', D): the
same head on every cell of the backbone's last feature map (:meth:`Student.forward_dense`),
computed in the same pass, and the metadata key ``retrofit.dense`` gives its name and grid
(:class:`~retrofit_agent.contract.bundle.DenseOutputSpec`) for the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from retrofit_agent.contract.bundle import DenseOutputSpec, InputSpec
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.preprocess import Preprocessor
from retrofit_agent.train.gate import onnx_cells
from retrofit_agent.train.student import Student

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
DENSE_NAME = "cell_embeddings"
DENSE_KEY = "retrofit.dense"
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


class _WithCells(nn.Module):
    """What the dense graph traces: (embedding, cells) from one backbone pass."""

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.forward_dense(images)


def dense_spec(student: Student) -> DenseOutputSpec:
    """The cells output a dense export of ``student`` has; a one-line ConfigError when it has none."""
    if not student.has_cells:
        raise ConfigError(
            f"student backbone {student.backbone_name!r} gives no spatial final feature map, so it has no cells to "
            "export; export without the dense output"
        )
    return DenseOutputSpec(name=DENSE_NAME, grid=student.cell_grid)


def export_onnx(student: Student, path: Path, metadata: dict[str, str], dense: bool = False) -> Path:
    """Export with a dynamic batch dimension, then run onnx.checker's full check.

    ``dense`` adds the ``cell_embeddings`` output and the ``retrofit.dense`` metadata key.
    """
    student = student.eval()
    h, w = student.input_size
    dummy = torch.zeros(1, 3, h, w)
    names = [OUTPUT_NAME]
    module: nn.Module = student
    if dense:
        metadata = {**metadata, DENSE_KEY: dense_spec(student).model_dump_json()}
        names, module = [OUTPUT_NAME, DENSE_NAME], _WithCells(student)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *names)},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    if dense:
        # The tracer leaves the cells' H', W', D symbolic (normalize's expand over a dynamic batch);
        # state them, so readers see the grid in the graph itself (full_check verifies them below).
        h_, w_ = student.cell_grid
        dims = model.graph.output[1].type.tensor_type.shape.dim
        for dim, value in zip(list(dims)[1:], (h_, w_, student.embed_dim)):
            dim.Clear()
            dim.dim_value = value
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
    """Max |torch − onnxruntime fp32| over the normalised embeddings of real frames, and over their
    cells when the model has them."""
    x = Preprocessor(spec).batch(frames)
    embedder = Embedder.from_onnx(onnx_path)  # the camera's own runtime path and checks
    t = torch.from_numpy(x).to(next(student.parameters()).device)
    with torch.no_grad():
        if embedder.spec.dense is None:
            ref = student.eval()(t).cpu().numpy()
            return float(np.abs(ref - embedder.embed_batch(x)).max())
        ref_emb, ref_cells = (a.cpu().numpy() for a in student.eval().forward_dense(t))
    emb, cells = onnx_cells(embedder, x)
    return float(max(np.abs(ref_emb - emb).max(), np.abs(ref_cells - cells).max()))
