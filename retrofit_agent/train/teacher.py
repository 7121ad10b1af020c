"""The frozen CLIP teacher (open_clip): image embeddings, text tower, identity."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from retrofit_agent.contract.bundle import InputSpec

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
        tokens = self.tokenizer(texts).to(self.device)
        return nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def input_spec(self) -> InputSpec:
        """The teacher's own view: its size and CLIP mean/std, resized like the student's.

        open_clip's eval transform resizes the short side and centre-crops; we stretch the
        whole frame instead, exactly as the student's spec does, so the 224 px teacher view
        and the 300 px student view show the same content (only the sampling differs).
        """
        return InputSpec(
            name="teacher", height=self.image_size, width=self.image_size, layout="NCHW", dtype="float32",
            color="RGB", mean=self.mean, std=self.std, resize="stretch", interpolation="area",
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        """The ViT's patch-token grid (16x16 for ViT-L/14 at 224 px); a class token comes first."""
        g = self.model.visual.grid_size
        return (int(g[0]), int(g[1]))

    @property
    def width(self) -> int:
        """Token width of the vision transformer (1024 for ViT-L/14)."""
        return int(self.model.visual.transformer.width)

    @property
    def num_heads(self) -> int:
        return int(self._blocks()[0].attn.num_heads)

    def _blocks(self) -> nn.ModuleList:
        blocks = getattr(getattr(getattr(self.model, "visual", None), "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(blocks[0], "attn") or not hasattr(blocks[0].attn, "in_proj_weight"):
            raise ValueError(
                f"teacher {self.model_name!r} is not a ViT with standard attention blocks; "
                "the PCA/GL projectors need one (use the embedding and affinity losses only)"
            )
        return blocks

    @torch.no_grad()
    def forward_features(self, images: torch.Tensor, layer: int = -1) -> "TeacherFeatures":
        """Embedding plus one block's patch tokens and per-head Q/K/V, through forward hooks.

        open_clip calls ``nn.MultiheadAttention`` with ``need_weights=False``, so the
        attention map is not observable as an output. We capture the block's attention
        input (``ln_1``'s output) instead and recompute Q, K, V with the block's own
        in-projection: the same numbers the block used.
        """
        block = self._blocks()[layer]
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            block.ln_1.register_forward_hook(lambda m, i, o: seen.__setitem__("attn_in", o)),
            block.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o)),
        ]
        try:
            embedding = nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
        finally:
            for h in hooks:
                h.remove()
        batch_first = getattr(self.model.visual.transformer, "batch_first", True)
        tokens, attn_in = seen["tokens"], seen["attn_in"]
        if not batch_first:
            tokens, attn_in = tokens.transpose(0, 1), attn_in.transpose(0, 1)
        attn = block.attn
        q, k, v = nn.functional.linear(attn_in, attn.in_proj_weight, attn.in_proj_bias).float().chunk(3, dim=-1)
        return TeacherFeatures(
            embedding=embedding, tokens=tokens.float(), q=_heads(q, attn.num_heads), k=_heads(k, attn.num_heads),
            v=_heads(v, attn.num_heads), grid=self.grid_size,
        )


@dataclass
class TeacherFeatures:
    """What the projectors align to. Token tensors keep the class token at index 0."""

    embedding: torch.Tensor  # (B, D) L2-normalised
    tokens: torch.Tensor  # (B, 1 + h*w, width): the block's output
    q: torch.Tensor  # (B, heads, 1 + h*w, head_dim)
    k: torch.Tensor
    v: torch.Tensor
    grid: tuple[int, int]

    def patch(self, t: torch.Tensor) -> torch.Tensor:
        """Drop the class token: the student's feature map has no counterpart for it."""
        n = self.grid[0] * self.grid[1]
        return t[..., t.shape[-2] - n :, :]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)
