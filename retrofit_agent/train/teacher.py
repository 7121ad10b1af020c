"""The frozen CLIP teacher (open_clip): image embeddings, text tower, identity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_local_configs() -> None:
    """Make the repo's small open_clip configs (e.g. ``retrofit-tiny-clip``) known by name."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


class Teacher(nn.Module):
    """An open_clip model by name, ``pretrained`` a published tag or a local checkpoint path.

    Always frozen and in eval mode; ``seed`` initialises weights reproducibly when no
    pretrained weights are given (tests and the untrained reference bundle only).
    """

    def __init__(self, model_name: str, pretrained: str | None = None, seed: int | None = None) -> None:
        super().__init__()
        register_local_configs()
        if seed is not None:
            torch.manual_seed(seed)
        self.model_name = model_name
        self.pretrained = pretrained
        self.model = open_clip.create_model(model_name, pretrained=pretrained)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model.eval().requires_grad_(False)
        pp = self.model.visual.preprocess_cfg
        self.image_size: int = int(pp.get("size", 224)) if isinstance(pp.get("size", 224), int) else int(pp["size"][0])
        self.mean: tuple[float, float, float] = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std: tuple[float, float, float] = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))

    def train(self, mode: bool = True) -> "Teacher":  # the teacher never trains
        return super().train(False)

    @property
    def identity(self) -> str:
        tag = self.pretrained if self.pretrained else "seeded-untrained"
        if tag and Path(tag).exists():
            tag = Path(tag).name
        return f"{self.model_name}/{tag}"

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if self.model.text_projection is not None else int(
            self.model.visual.output_dim
        )

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def fingerprint(self) -> str:
        """Hash of the weights that define the shared embedding space (both projections)."""
        h = hashlib.sha256(self.model_name.encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            if name.endswith(("text_projection", "visual.proj", "logit_scale")):
                h.update(name.encode())
                h.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts)
        return nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
