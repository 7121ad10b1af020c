"""The student: a timm backbone plus an MLP projection head into the teacher's space."""

from __future__ import annotations

import timm
import torch
from torch import nn


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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.backbone(images)), dim=-1)
