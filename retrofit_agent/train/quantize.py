"""Static int8 post-training quantization (onnxruntime, QDQ, per-channel weights)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


@dataclass(frozen=True)
class QuantSettings:
    method: str = "minmax"
    per_channel: bool = True
    nodes_to_exclude: list[str] = field(default_factory=list)

    def describe(self, n_images: int) -> str:
        return f"{self.method}, {n_images} images"


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, tensors: list[np.ndarray]) -> None:
        self._items = iter([{input_name: t} for t in tensors])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_int8(
    fp32_path: Path, out_path: Path, input_name: str, calib: list[np.ndarray], settings: QuantSettings
) -> Path:
    """Pre-process (shape inference, optimisation), then quantize to QDQ int8.

    Activations are uint8 and weights int8 (onnxruntime's recommended U8S8 on x86;
    ARM's kernels accept it too).
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=False)
        quantize_static(
            str(prepped), str(out_path), _Batches(input_name, calib),
            quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=_METHODS[settings.method], nodes_to_exclude=settings.nodes_to_exclude or None,
            extra_options={"CalibMovingAverage": False},
        )
    return out_path
