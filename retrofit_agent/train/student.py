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

    def feature_channels(self, index: int) -> int:
        """Channels of feature map ``index`` (timm feature_info order; negative from the end)."""
        return int(self.backbone.feature_info[index]["num_chs"])

    def forward_with_features(self, images: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding and feature map ``index`` from one pass (for the projectors).

        Uses timm's ``forward_intermediates`` (which honours gradient checkpointing) where
        the model has it, and a forward hook on the feature_info module otherwise.
        """
        n = len(self.backbone.feature_info)
        idx = index % n
        if hasattr(self.backbone, "forward_intermediates"):
            final, maps = self.backbone.forward_intermediates(images, indices=[idx])
            pooled = self.backbone.forward_head(final, pre_logits=True)
            return nn.functional.normalize(self.head(pooled), dim=-1), maps[0]
        seen: dict[str, torch.Tensor] = {}
        module = self.backbone.get_submodule(self.backbone.feature_info[idx]["module"])
        hook = module.register_forward_hook(lambda m, i, o: seen.setdefault("map", o))
        try:
            emb = self(images)
        finally:
            hook.remove()
        return emb, seen["map"]

    def describe(self) -> dict:
        """What export needs to rebuild this student from a state dict."""
        return {
            "backbone": self.backbone_name,
            "embed_dim": self.embed_dim,
            "hidden_dim": self.head.net[0].out_features,
            "input_size": self.input_size[0],
        }
