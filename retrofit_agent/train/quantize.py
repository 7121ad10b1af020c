"""Static int8 post-training quantization (onnxruntime, QDQ, per-channel weights)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from retrofit_agent.contract.errors import ConfigError

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    # MinMax over the mean of every calibration picture's own min and max (onnxruntime's moving
    # average, with the pictures fed one at a time), instead of the extremes over all of them. On the
    # world reference a few rare, huge activations stretched the extremes until every other value
    # had a handful of levels: minmax 0.40 mean cosine, minmax-mean 0.985 (README, "The reference
    # bundle"). It is also the range `retrofit-model qat` trains under.
    "minmax-mean": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


# Name patterns of the parts of an exported timm CNN that are fragile under int8
# (EfficientNet: the stem sees raw pixel statistics, squeeze-excitation gates multiply
# activations by sigmoid outputs, the head's last matmul sets the embedding directly).
# Anchored at the graph's top: the plain export traces the Student ("/backbone/conv_stem/Conv"),
# the dense one its cell wrapper, which calls the backbone's parts itself ("/conv_stem/Conv").
# Unanchored or backbone-only patterns once matched nothing in a dense export, silently.
EXCLUDE_PRESETS = {
    "first_conv": (r"^(/backbone)?/conv_stem/", r"^(/backbone)?/bn1/"),
    "se": (r"/se/",),
    "head": (r"^(/backbone)?/conv_head/", r"^(/backbone)?/bn2/", r"^/head/"),
}


@dataclass(frozen=True)
class QuantSettings:
    method: str = "minmax"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()  # preset names from EXCLUDE_PRESETS and/or regexes

    def describe(self, n_images: int) -> str:
        excluded = f", float: {'+'.join(self.exclude)}" if self.exclude else ""
        return f"{self.method}, {n_images} images{excluded}"


def nodes_matching(model_path: Path, exclude: tuple[str, ...]) -> list[str]:
    """Node names selected by presets (see EXCLUDE_PRESETS) or regular expressions."""
    return _matching(_node_names(model_path), exclude)


def _node_names(model_path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node]


def _matching(names: list[str], exclude: tuple[str, ...]) -> list[str]:
    import re

    patterns = [p for e in exclude for p in EXCLUDE_PRESETS.get(e, (e,))]
    return [n for n in names if any(re.search(p, n) for p in patterns)]


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
        names = _node_names(prepped)
        excluded = _matching(names, settings.exclude)
        # A pattern that names no node would keep nothing in float and pass silently.
        idle = [e for e in settings.exclude if not _matching(names, (e,))]
        if idle:
            raise ConfigError(f"--exclude: {', '.join(idle)} matches no node of {fp32_path.name}")
        quantize_static(
            str(prepped),
            str(out_path),
            _Batches(input_name, calib),
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_METHODS[settings.method],
            nodes_to_exclude=excluded or None,
            extra_options={"CalibMovingAverage": settings.method == "minmax-mean"},
        )
    _mark_quantized(out_path)
    return out_path


def _mark_quantized(path: Path) -> None:
    """Record the precision in the model's metadata, beside what export wrote, so that every
    reader (bundle assembly, the Embedder's spec) learns it from the file itself."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p for p in model.metadata_props}
    entry = meta.get("retrofit.quantization") or model.metadata_props.add()
    entry.key, entry.value = "retrofit.quantization", "int8_static_qdq"
    onnx.save(model, str(path))


def to_ort_format(onnx_path: Path) -> Path:
    """Convert to the .ort format that minimal onnxruntime builds on the camera load."""
    import onnxruntime as ort

    out = onnx_path.with_suffix(".ort")
    opts = ort.SessionOptions()
    # Basic level only: extended/layout optimisations are hardware-specific and would be
    # baked in for this workstation's CPU rather than the camera's.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(out)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return out
