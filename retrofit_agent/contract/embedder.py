"""The onnxruntime image encoder, checked against the bundle manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from retrofit_agent.contract.bundle import DenseOutputSpec, InputSpec, ModelSpec, OutputSpec, Quantization
from retrofit_agent.contract.errors import BundleError


def session_options(intra_op_threads: int, spinning: bool = False) -> ort.SessionOptions:
    """Options for a latency-bound, single-stream daemon.

    Spinning is off by default: on a 2-core camera busy-waiting intra-op threads steal the
    core the grabber thread needs to decode the next frame. The daemon turns it on only
    where measurement on the device says it pays (``daemon/variants.py``).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def open_session(path: Path, intra_op_threads: int = 0, spinning: bool = False) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(intra_op_threads, spinning), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"model {path}: onnxruntime cannot load it: {first}") from None


class Embedder:
    """Runs the image encoder on one preprocessed tensor and returns a unit embedding."""

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec, where: str = "model") -> None:
        self.session = session
        self.spec = spec
        inp = _find(session.get_inputs(), spec.input.name, "input", where)
        out = _find(session.get_outputs(), spec.output.name, "output", where)
        _check_shape(inp.shape, _expected_input_shape(spec), f"{where}: input {inp.name!r}")
        _check_shape(out.shape, [None, spec.output.embedding_dim], f"{where}: output {out.name!r}")
        if inp.type != "tensor(float)":
            raise BundleError(f"{where}: input {inp.name!r} is {inp.type}, manifest says float32")
        self._input_name = inp.name
        self._output_names = [out.name]
        self._dense_names: list[str] | None = None
        if spec.dense is not None:
            dense = _find(session.get_outputs(), spec.dense.name, "dense output", where)
            _check_shape(
                dense.shape, [None, *spec.dense.grid, spec.output.embedding_dim], f"{where}: output {dense.name!r}"
            )
            self._dense_names = [out.name, dense.name]

    @property
    def has_cells(self) -> bool:
        return self._dense_names is not None

    @classmethod
    def from_file(cls, path: Path, spec: ModelSpec, intra_op_threads: int = 0, spinning: bool = False) -> Embedder:
        return cls(open_session(path, intra_op_threads, spinning), spec, where=f"model {path}")

    @classmethod
    def from_onnx(cls, path: Path, intra_op_threads: int = 0) -> Embedder:
        """An embedder for a model the exporter wrote, its spec read from the ONNX metadata.

        The toolchain's gate, parity check, evaluation and bench use this, so they run the
        model exactly as the camera does (same session options, same checks).
        """
        session = open_session(path, intra_op_threads)
        return cls(session, spec_from_metadata(session, path), where=f"model {path}")

    def embed_many(self, tensor: np.ndarray, batch: int = 16) -> np.ndarray:
        """(N, ...) → (N, dim) unit embeddings, run ``batch`` at a time."""
        out = np.concatenate([self.embed_batch(tensor[i : i + batch]) for i in range(0, len(tensor), batch)])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)

    def embed_batch(self, tensor: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(self._output_names, {self._input_name: tensor})
        return np.asarray(out)

    def embed(self, tensor: np.ndarray) -> np.ndarray:
        """(1, ...) tensor → (dim,) float32 embedding, re-normalised for safety under int8."""
        e: np.ndarray = self.embed_batch(tensor)[0]
        n = float(np.linalg.norm(e))
        return e / n if n > 0 else e

    def embed_with_cells(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(1, ...) tensor → the unit embedding and, when the model has them, its (H', W', D) cells.

        One pass computes both: the cells are the same backbone's last feature map through the
        same head, so asking for them costs only the head per cell.
        """
        if self._dense_names is None:
            return self.embed(tensor), None
        out, cells = self.session.run(self._dense_names, {self._input_name: tensor})
        e = np.asarray(out[0])
        n = float(np.linalg.norm(e))
        return (e / n if n > 0 else e), np.asarray(cells[0])

    def warmup(self, runs: int) -> None:
        shape = [1 if not isinstance(d, int) else d for d in _expected_input_shape(self.spec)]
        x = np.zeros(shape, dtype=np.float32)
        for _ in range(runs):
            if self._dense_names is not None:
                self.embed_with_cells(x)
            else:
                self.embed_batch(x)


def _expected_input_shape(spec: ModelSpec) -> list[int | None]:
    h, w = spec.input.height, spec.input.width
    return [None, 3, h, w] if spec.input.layout == "NCHW" else [None, h, w, 3]


def _find(args: list[ort.NodeArg], name: str, what: str, where: str) -> ort.NodeArg:
    for a in args:
        if a.name == name:
            return a
    names = [a.name for a in args]
    raise BundleError(f"{where}: manifest names {what} {name!r} but the model has {names}")


def _check_shape(actual: list[int | str | None], expected: list[int | None], where: str) -> None:
    ok = len(actual) == len(expected) and all(
        e is None or not isinstance(a, int) or a == e for a, e in zip(actual, expected)
    )
    if not ok:
        shown = ["N" if e is None else e for e in expected]
        raise BundleError(f"{where}: shape {actual} does not match the manifest's {shown}")


def spec_from_metadata(session: ort.InferenceSession, path: Path) -> ModelSpec:
    """The ModelSpec ``retrofit-model export`` recorded in the ONNX file (read through onnxruntime)."""
    meta = session.get_modelmeta().custom_metadata_map
    missing = [k for k in ("retrofit.input_spec", "retrofit.embedding_dim") if k not in meta]
    if missing:
        raise BundleError(f"model {path}: ONNX metadata lacks {missing}; export it with retrofit-model export")
    mode = meta.get("retrofit.quantization", "none")  # written by retrofit-model quantize
    dense = None
    if "retrofit.dense" in meta:  # written by retrofit-model export --dense
        try:
            dense = DenseOutputSpec.model_validate_json(meta["retrofit.dense"])
        except ValueError as e:
            raise BundleError(f"model {path}: ONNX metadata 'retrofit.dense' is invalid: {e}") from None
    return ModelSpec(
        file=path.name,
        architecture=meta.get("retrofit.architecture", "unknown"),
        input=InputSpec.model_validate_json(meta["retrofit.input_spec"]),
        output=OutputSpec(name=session.get_outputs()[0].name, embedding_dim=int(meta["retrofit.embedding_dim"])),
        quantization=Quantization(mode="int8_static_qdq" if mode == "int8_static_qdq" else "none"),
        dense=dense,
    )
