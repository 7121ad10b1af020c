"""The student: a timm backbone plus an MLP projection head into the teacher's space.

The same head also maps every cell of the backbone's last feature map (before global
pooling) into that space: a 1x1 convolution with the pooled head's weights, the MaskCLIP
idea for a CNN. :meth:`Student.forward_dense` gives the pooled embedding and the cells
from one backbone pass; they are what ``retrofit-model export --dense`` writes as the
``cell_embeddings`` output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from retrofit_agent.contract.errors import ConfigError


class ProjectionHead(nn.Module):
    """Pooled backbone features → teacher embedding dim (Linear-GELU-Dropout-Linear)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Student(nn.Module):
    """``forward(images)`` returns L2-normalised embeddings in the teacher's space."""

    def __init__(
        self,
        backbone: str = "efficientnet_b3",
        embed_dim: int = 768,
        hidden_dim: int = 1024,
        pretrained: bool = False,
        drop_rate: float = 0.0,
        input_size: int = 300,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, drop_rate=drop_rate)
        self.head = ProjectionHead(self.backbone.num_features, embed_dim, hidden_dim)
        cfg = self.backbone.pretrained_cfg
        self.input_size = (input_size, input_size)  # the paper's 300x300, not timm's eval size
        self.mean: tuple[float, float, float] = tuple(cfg["mean"])
        self.std: tuple[float, float, float] = tuple(cfg["std"])
        self.embed_dim = embed_dim
        self._grid: tuple[tuple[int, int], tuple[int, int]] | None = None  # (input size, cell grid) measured

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.backbone(images)), dim=-1)

    def forward_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) unit embeddings, exactly as :meth:`forward`, and (N, H', W', D) unit cells, from one pass."""
        final = self.backbone.forward_features(images)
        return self._embed_and_cells(final)

    def _embed_and_cells(self, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled head and the per-cell head on the backbone's final (N, C, H', W') map."""
        self._check_spatial(final)
        pooled = self.backbone.forward_head(final, pre_logits=True)
        emb = nn.functional.normalize(self.head(pooled), dim=-1)
        # The head on a (cells, C) matrix is the 1x1 convolution with its own weights. Flattened to 2-d
        # it exports as the same Gemm on the same initializers as the pooled path: one copy of the
        # head in the ONNX file, not a second, transposed one for a MatMul over (N, H', W', C).
        n, c, h, w = final.shape
        flat = final.permute(0, 2, 3, 1).reshape(-1, c)
        cells = nn.functional.normalize(self.head(flat), dim=-1).reshape(n, h, w, -1)
        return emb, cells

    def _check_spatial(self, final: torch.Tensor) -> None:
        if (
            torch.onnx.is_in_onnx_export()
        ):  # ONNX export: checked by export before tracing (shapes are traced values here)
            return
        if final.ndim != 4 or final.shape[1] != self.backbone.num_features:
            raise ValueError(
                f"student backbone {self.backbone_name!r} gives a final feature map of shape {tuple(final.shape)}, "
                f"not (N, {self.backbone.num_features}, H', W'): it has no spatial map to give cells"
            )

    @property
    def has_cells(self) -> bool:
        """Whether the backbone's final features are a (N, C, H', W') map the head can be applied to per cell."""
        try:
            return min(self.cell_grid) > 0
        except ValueError:
            return False

    @property
    def cell_grid(self) -> tuple[int, int]:
        """(H', W'): the final feature map's rows and columns at :attr:`input_size`.

        Measured with one forward pass of a single blank image (the arithmetic of paddings and
        strides differs between timm families), in eval mode so BatchNorm statistics are untouched.
        """
        if self._grid is None or self._grid[0] != self.input_size:
            was_training = self.training
            self.eval()
            try:
                p = next(self.backbone.parameters())
                with torch.no_grad():
                    final = self.backbone.forward_features(torch.zeros(1, 3, *self.input_size, device=p.device))
            finally:
                self.train(was_training)
            self._check_spatial(final)
            self._grid = (self.input_size, (int(final.shape[2]), int(final.shape[3])))
        return self._grid[1]

    def feature_channels(self, index: int) -> int:
        """Channels of feature map ``index`` (timm feature_info order; negative from the end)."""
        return int(self.backbone.feature_info[index]["num_chs"])

    def forward_with_features(self, images: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding and feature map ``index`` from one pass (for the projectors)."""
        final, fmap = self._final_and_map(images, index)
        return nn.functional.normalize(self.head(self.backbone.forward_head(final, pre_logits=True)), dim=-1), fmap

    def forward_dense_with_features(
        self, images: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embedding, feature map ``index`` and cells from one pass (projectors and the dense loss together)."""
        final, fmap = self._final_and_map(images, index)
        emb, cells = self._embed_and_cells(final)
        return emb, fmap, cells

    def _final_and_map(self, images: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The final (pre-pooling) features and feature map ``index``, from one pass.

        Uses timm's ``forward_intermediates`` (which honours gradient checkpointing) where
        the model has it, and a forward hook on the feature_info module otherwise.
        """
        n = len(self.backbone.feature_info)
        idx = index % n
        if hasattr(self.backbone, "forward_intermediates"):
            final, maps = self.backbone.forward_intermediates(images, indices=[idx])
            return final, maps[0]
        seen: dict[str, torch.Tensor] = {}
        module = self.backbone.get_submodule(self.backbone.feature_info[idx]["module"])
        hook = module.register_forward_hook(lambda m, i, o: seen.setdefault("map", o))
        try:
            final = self.backbone.forward_features(images)
        finally:
            hook.remove()
        return final, seen["map"]

    def describe(self) -> dict:
        """What export needs to rebuild this student from a state dict."""
        return {
            "backbone": self.backbone_name,
            "embed_dim": self.embed_dim,
            "hidden_dim": self.head.net[0].out_features,
            "input_size": self.input_size[0],
        }


def read_student_file(path: Path, label: str) -> dict[str, Any]:
    """A ``student.pt`` written by ``retrofit-model distill``: its ``architecture`` and ``student``
    state dict (and the run's other records); a one-line ConfigError naming ``label`` otherwise."""
    import pickle

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        if isinstance(e, pickle.UnpicklingError):  # torch's message suggests weights_only=False: never here
            reason = "not a weights-only PyTorch file"
        else:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{label}: cannot load {path} ({reason}); is it a student.pt from a distill run?") from None
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("architecture"), dict)
        or not isinstance(saved.get("student"), dict)
    ):
        raise ConfigError(f"{label}: {path} is not a student file from 'retrofit-model distill' (student.pt)")
    return saved
