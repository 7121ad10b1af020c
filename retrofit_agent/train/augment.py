"""Perturbed student views for multi-view robust training, on whole batches.

Runs on the training device after the batch arrives (cheap on a GPU, no per-image Python
in the workers). Randomness comes from an explicit ``torch.Generator`` seeded from
(run seed, step, rank), so a resumed run perturbs step N exactly as an uninterrupted one.

Each transform is drawn per image with its own probability: colour jitter, random
resized crop, rotation, patch masking. Crop and rotation are one affine resampling;
areas outside the source, and masked patches, are filled with 0 in normalised space,
i.e. the dataset's mean colour.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from retrofit_agent.train.config import AugmentConfig

_GRAY = (0.299, 0.587, 0.114)


class Augmenter:
    """``augmenter(x, generator)`` → perturbed copy of a normalised (B, 3, H, W) batch."""

    def __init__(self, cfg: AugmentConfig, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if not self.cfg.enabled:
            return x
        c, b = self.cfg, x.shape[0]
        flags = {name: torch.rand(b, generator=gen) < p for name, p in
                 (("color", c.p_color), ("crop", c.p_crop), ("rotate", c.p_rotate), ("mask", c.p_mask))}
        x = x.clone()
        x = self._color(x, flags["color"], gen)
        x = self._geometry(x, flags["crop"], flags["rotate"], gen)
        return self._mask(x, flags["mask"], gen)

    def _uniform(self, n: int, spread: float, gen: torch.Generator) -> torch.Tensor:
        return 1 + (torch.rand(n, generator=gen) * 2 - 1) * spread

    def _color(self, x: torch.Tensor, on: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = int(on.sum())
        if n == 0:
            return x
        c, dev = self.cfg, x.device
        mean, std = self.mean.to(dev, x.dtype), self.std.to(dev, x.dtype)
        fb, fc, fs = (self._uniform(n, s, gen).to(dev, x.dtype).view(n, 1, 1, 1) for s in (c.brightness, c.contrast, c.saturation))
        img = x[on] * std + mean  # back to [0, 1] RGB
        img = img * fb
        gray = (img * torch.tensor(_GRAY, device=dev, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        img = (img - gray.mean((2, 3), keepdim=True)) * fc + gray.mean((2, 3), keepdim=True)
        gray = (img * torch.tensor(_GRAY, device=dev, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        img = ((img - gray) * fs + gray).clamp(0, 1)
        x[on] = (img - mean) / std
        return x

    def _geometry(self, x: torch.Tensor, crop: torch.Tensor, rotate: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        on = crop | rotate
        n = int(on.sum())
        if n == 0:
            return x
        c = self.cfg
        # Crop: area fraction and aspect ratio (log-uniform in [3/4, 4/3]), placed inside.
        area = c.crop_scale[0] + torch.rand(n, generator=gen) * (c.crop_scale[1] - c.crop_scale[0])
        ratio = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * math.log(4 / 3))
        sx, sy = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
        cx, cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx), (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
        keep = ~crop[on]
        sx, sy, cx, cy = (torch.where(keep, d, v) for v, d in ((sx, 1.0), (sy, 1.0), (cx, 0.0), (cy, 0.0)))
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(c.max_rotation_deg)
        angle = torch.where(rotate[on], angle, torch.zeros_like(angle))
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([sx * cos, -sy * sin, cx], -1), torch.stack([sx * sin, sy * cos, cy], -1)], 1)
        sub = x[on]
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(sub.shape), align_corners=False)
        x[on] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x

    def _mask(self, x: torch.Tensor, on: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = int(on.sum())
        if n == 0 or self.cfg.mask_ratio == 0:
            return x
        h, w = x.shape[-2:]
        ph, pw = max(1, round(h * self.cfg.mask_patch)), max(1, round(w * self.cfg.mask_patch))
        gh, gw = math.ceil(h / ph), math.ceil(w / pw)
        masked = torch.rand(n, gh * gw, generator=gen).argsort(-1) < round(self.cfg.mask_ratio * gh * gw)
        keep = (~masked).view(n, 1, gh, gw).to(x.device, x.dtype)
        keep = keep.repeat_interleave(ph, 2).repeat_interleave(pw, 3)[..., :h, :w]
        x[on] = x[on] * keep
        return x


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The augmentation RNG for one step: a pure function of (seed, step, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)
