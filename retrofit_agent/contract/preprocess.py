"""Frame → model input tensor. The single implementation shared by the daemon, the
exporter's parity check and the evaluator, so training and deployment cannot drift.

Everything that varies between models (size, colour order, mean/std, resize mode,
filter, layout) comes from the bundle's :class:`~retrofit_agent.contract.bundle.InputSpec`.
"""

from __future__ import annotations

import cv2
import numpy as np

from retrofit_agent.contract.bundle import InputSpec

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


class BadFrameError(ValueError):
    """A frame that cannot be turned into a 3-channel 8-bit image."""


def to_bgr8(frame: np.ndarray | None) -> np.ndarray:
    """Bring what a capture backend returned to HxWx3 uint8 BGR, or raise BadFrameError.

    Grayscale, BGRA and 16-bit frames are converted (cameras do deliver them); empty,
    zero-size and other shapes are rejected.
    """
    if frame is None or not isinstance(frame, np.ndarray) or frame.size == 0:
        raise BadFrameError("empty frame")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise BadFrameError(f"unsupported frame shape {frame.shape}")
    if frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    elif frame.dtype in (np.float32, np.float64):
        frame = np.clip(frame * 255.0, 0, 255).astype(np.uint8)
    elif frame.dtype != np.uint8:
        raise BadFrameError(f"unsupported frame dtype {frame.dtype}")
    channels = frame.shape[2]
    if channels == 3:
        return frame
    if channels == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    raise BadFrameError(f"unsupported channel count {channels}")


def placement(spec: InputSpec, fh: int, fw: int) -> tuple[int, int, int, int]:
    """Where an ``fh`` x ``fw`` frame lands in the model's input: ``(rh, rw, oy, ox)``.

    The frame is scaled to ``rh`` x ``rw`` and its top-left corner sits at ``(oy, ox)`` of the
    input image (negative where a centre crop cuts it). The resize and the mapping of regions
    back to frame coordinates (``contract.regions``) both read it, so they cannot disagree.
    """
    h, w = spec.height, spec.width
    if spec.resize == "stretch" or (fh, fw) == (h, w):
        return h, w, 0, 0
    if spec.resize == "center_crop":
        scale = max(h / fh, w / fw)
        rh, rw = max(h, round(fh * scale)), max(w, round(fw * scale))
        return rh, rw, -((rh - h) // 2), -((rw - w) // 2)
    scale = min(h / fh, w / fw)
    rh, rw = max(1, round(fh * scale)), max(1, round(fw * scale))
    return rh, rw, (h - rh) // 2, (w - rw) // 2


class Preprocessor:
    """Callable turning a BGR uint8 frame (or a batch of them) into the model's input."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self._interp = _INTERPOLATION[spec.interpolation]
        # Inputs are uint8, so (x/255 - mean)/std per channel is a 256-entry lookup table:
        # ~10x cheaper than float arithmetic on the frame, and bit-identical.
        levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
        self._luts = [
            ((levels - np.float32(m)) / np.float32(sd)).astype(np.float32) for m, sd in zip(spec.mean, spec.std)
        ]
        # Output channel c of the model reads channel _src[c] of the BGR frame.
        self._src = (2, 1, 0) if spec.color == "RGB" else (0, 1, 2)
        # The same tables laid out per BGR channel, for one cv2.LUT pass over the whole frame
        # (a third cheaper than a numpy lookup per channel; the numbers are the same).
        self._lut_bgr = np.empty((1, 256, 3), dtype=np.float32)
        for c, src in enumerate(self._src):
            self._lut_bgr[0, :, src] = self._luts[c]

    def resize(self, frame: np.ndarray) -> np.ndarray:
        """Resize (and crop or pad) a uint8 frame to the model's input size."""
        h, w = self.spec.height, self.spec.width
        fh, fw = frame.shape[:2]
        if self.spec.resize == "stretch" or (fh, fw) == (h, w):
            return cv2.resize(frame, (w, h), interpolation=self._interp)
        rh, rw, oy, ox = placement(self.spec, fh, fw)
        resized = cv2.resize(frame, (rw, rh), interpolation=self._interp)
        if self.spec.resize == "center_crop":
            return resized[-oy : -oy + h, -ox : -ox + w]
        # letterbox: fit inside, pad with the mean colour so padding normalises to ~0
        pad = [int(round(m * 255)) for m in self.spec.mean]
        if self.spec.color == "RGB":
            pad = pad[::-1]  # frame is still BGR here
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = pad
        out[oy : oy + rh, ox : ox + rw] = resized
        return out

    def normalize(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 HxWx3 BGR at input size → the model's (1, ...) float32 tensor."""
        h, w = image.shape[:2]
        nchw = self.spec.layout == "NCHW"
        if out is None:
            out = np.empty((1, 3, h, w) if nchw else (1, h, w, 3), dtype=np.float32)
        mapped = cv2.LUT(np.ascontiguousarray(image), self._lut_bgr)  # HxWx3 float32, BGR order
        for c, src in enumerate(self._src):
            if nchw:
                out[0, c] = mapped[:, :, src]
            else:
                out[0, :, :, c] = mapped[:, :, src]
        return out

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """One BGR frame → a (1, C, H, W) or (1, H, W, C) float32 tensor."""
        return self.normalize(self.resize(frame))

    def batch(self, frames: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([self(f) for f in frames], axis=0)
