"""The onnxruntime image encoder, checked against the bundle manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from retrofit_agent.contract.bundle import ModelSpec
from retrofit_agent.contract.errors import BundleError


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Options for a latency-bound, single-stream daemon.

    Spinning is off: on a 2-core camera busy-waiting intra-op threads steal the core the
    grabber thread needs to decode the next frame.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def open_session(path: Path, intra_op_threads: int = 0) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(intra_op_threads), providers=["CPUExecutionProvider"]
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

    @classmethod
    def from_file(cls, path: Path, spec: ModelSpec, intra_op_threads: int = 0) -> "Embedder":
        return cls(open_session(path, intra_op_threads), spec, where=f"model {path}")

    def embed_batch(self, tensor: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(self._output_names, {self._input_name: tensor})
        return out

    def embed(self, tensor: np.ndarray) -> np.ndarray:
        """(1, ...) tensor → (dim,) float32 embedding, re-normalised for safety under int8."""
        e = self.embed_batch(tensor)[0]
        n = float(np.linalg.norm(e))
        return e / n if n > 0 else e

    def warmup(self, runs: int) -> None:
        shape = [1 if not isinstance(d, int) else d for d in _expected_input_shape(self.spec)]
        x = np.zeros(shape, dtype=np.float32)
        for _ in range(runs):
            self.embed_batch(x)


def _expected_input_shape(spec: ModelSpec) -> list[int | None]:
    h, w = spec.input.height, spec.input.width
    return [None, 3, h, w] if spec.input.layout == "NCHW" else [None, h, w, 3]


def _find(args: list, name: str, what: str, where: str):
    for a in args:
        if a.name == name:
            return a
    names = [a.name for a in args]
    raise BundleError(f"{where}: manifest names {what} {name!r} but the model has {names}")


def _check_shape(actual: list, expected: list[int | None], where: str) -> None:
    ok = len(actual) == len(expected) and all(
        e is None or not isinstance(a, int) or a == e for a, e in zip(actual, expected)
    )
    if not ok:
        shown = ["N" if e is None else e for e in expected]
        raise BundleError(f"{where}: shape {actual} does not match the manifest's {shown}")
