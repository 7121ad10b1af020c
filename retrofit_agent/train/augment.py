"""Augmented training views for multi-view robust training, on whole batches.

A view is drawn once and applied to any rendering of the image: the student's (its size,
its mean/std) and, with ``augment.teacher_view = "same"``, the teacher's (its size, CLIP
mean/std). Geometry is an affine map in normalised coordinates and colour works in
[0, 1] RGB, so the same :class:`ViewParams` give the same picture at any resolution and
normalisation: the teacher's tokens then describe the positions the student sees.

Each transform is drawn per image with its own probability: colour jitter, random
resized crop, rotation (shared with the teacher), patch masking (the student's alone: an
occlusion the student must see through, not a change of what the image shows). Crop and
rotation are one affine resampling; areas outside the source, and masked patches, are
filled with 0 in normalised space, i.e. the model's mean colour.

Runs on the training device after the batch arrives. Randomness comes from an explicit
``torch.Generator`` seeded from (run seed, step, rank), so a resumed run perturbs step N
exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from retrofit_agent.train.config import AugmentConfig

_GRAY = (0.299, 0.587, 0.114)
PARAMS = 11  # packed floats per view: colour on, 3 factors, geometry on, 2x3 affine


@dataclass(frozen=True)
class Normalisation:
    """A model's input normalisation: ``(rgb - mean) / std``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def tensors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return mean, torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)


@dataclass(frozen=True)
class ViewParams:
    """Per-image parameters of the shared part of a view (colour and geometry)."""

    color_on: torch.Tensor  # (B,) bool
    color: torch.Tensor  # (B, 3) brightness, contrast, saturation factors
    geometry_on: torch.Tensor  # (B,) bool
    theta: torch.Tensor  # (B, 2, 3) affine_grid matrix, output → input, normalised coordinates

    def __len__(self) -> int:
        return int(self.color_on.shape[0])

    @classmethod
    def identity(cls, n: int) -> ViewParams:
        theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3).clone()
        off = torch.zeros(n, dtype=torch.bool)
        return cls(off, torch.ones(n, 3), off.clone(), theta)

    def pack(self) -> torch.Tensor:
        """(B, PARAMS) float32: what the teacher cache stores per view."""
        return torch.cat(
            [
                self.color_on.float()[:, None],
                self.color.float(),
                self.geometry_on.float()[:, None],
                self.theta.float().reshape(-1, 6),
            ],
            dim=1,
        )

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> ViewParams:
        p = packed.float().cpu()
        return cls(p[:, 0] > 0.5, p[:, 1:4], p[:, 4] > 0.5, p[:, 5:11].reshape(-1, 2, 3))


class Augmenter:
    """Draws views (:meth:`sample`, :meth:`sample_mask`) and renders them (:meth:`apply`).

    ``augmenter(x, generator)`` draws and applies a full view (masking included) to a batch
    in the student's normalisation given at construction.
    """

    def __init__(self, cfg: AugmentConfig, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        self.cfg = cfg
        self.norm = Normalisation(tuple(mean), tuple(std))

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if not self.cfg.enabled:
            return x
        params = self.sample(x.shape[0], gen)
        return self.apply(x, params, self.norm, self.sample_mask(x.shape[0], gen))

    # ---- drawing

    def sample(self, n: int, gen: torch.Generator) -> ViewParams:
        """Colour and geometry for ``n`` images (identity where a transform is not drawn)."""
        if not self.cfg.enabled:
            return ViewParams.identity(n)
        c = self.cfg
        color_on, crop, rotate = (torch.rand(n, generator=gen) < p for p in (c.p_color, c.p_crop, c.p_rotate))
        color = torch.stack(
            [1 + (torch.rand(n, generator=gen) * 2 - 1) * s for s in (c.brightness, c.contrast, c.saturation)], 1
        )
        color = torch.where(color_on[:, None], color, torch.ones_like(color))
        # Crop: area fraction and aspect ratio (log-uniform in [3/4, 4/3]), placed inside.
        area = c.crop_scale[0] + torch.rand(n, generator=gen) * (c.crop_scale[1] - c.crop_scale[0])
        ratio = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * math.log(4 / 3))
        sx, sy = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
        cx, cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx), (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
        keep = ~crop
        sx, sy, cx, cy = (
            torch.where(keep, torch.full_like(v, d), v) for v, d in ((sx, 1.0), (sy, 1.0), (cx, 0.0), (cy, 0.0))
        )
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(c.max_rotation_deg)
        angle = torch.where(rotate, angle, torch.zeros_like(angle))
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([sx * cos, -sy * sin, cx], -1), torch.stack([sx * sin, sy * cos, cy], -1)], 1)
        return ViewParams(color_on, color, crop | rotate, theta)

    def sample_mask(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        """(n, cells, cells) keep-mask (the student's occlusion), or None when nothing is masked."""
        c = self.cfg
        if not c.enabled or c.p_mask == 0 or c.mask_ratio == 0:
            return None
        on = torch.rand(n, generator=gen) < c.p_mask
        cells = math.ceil(1 / c.mask_patch)
        masked = torch.rand(n, cells * cells, generator=gen).argsort(-1) < round(c.mask_ratio * cells * cells)
        return ~(masked & on[:, None]).view(n, cells, cells)

    # ---- rendering

    def apply(
        self, x: torch.Tensor, params: ViewParams, norm: Normalisation, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Render views of a normalised (B, 3, H, W) batch; only drawn transforms touch an image."""
        x = x.clone()
        x = self._color(x, params, norm)
        x = self._geometry(x, params)
        return x if mask is None else self._mask(x, mask)

    def _color(self, x: torch.Tensor, params: ViewParams, norm: Normalisation) -> torch.Tensor:
        on = params.color_on.to(x.device)
        if not bool(on.any()):
            return x
        mean, std = norm.tensors(x)
        f = params.color.to(x.device, x.dtype)[on]
        fb, fc, fs = (f[:, i].view(-1, 1, 1, 1) for i in range(3))
        gray_w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        img = x[on] * std + mean  # back to [0, 1] RGB
        img = img * fb
        gray = (img * gray_w).sum(1, keepdim=True)
        img = (img - gray.mean((2, 3), keepdim=True)) * fc + gray.mean((2, 3), keepdim=True)
        gray = (img * gray_w).sum(1, keepdim=True)
        img = ((img - gray) * fs + gray).clamp(0, 1)
        x[on] = (img - mean) / std
        return x

    def _geometry(self, x: torch.Tensor, params: ViewParams) -> torch.Tensor:
        on = params.geometry_on.to(x.device)
        if not bool(on.any()):
            return x
        sub = x[on]
        grid = F.affine_grid(params.theta.to(x.device, x.dtype)[on], list(sub.shape), align_corners=False)
        x[on] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x

    def _mask(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # Cells are fractions of the image, so a mask means the same area at any resolution.
        k = F.interpolate(keep[:, None].to(x.device, x.dtype), size=tuple(x.shape[-2:]), mode="nearest")
        return x * k


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The augmentation RNG for one step: a pure function of (seed, step, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)
