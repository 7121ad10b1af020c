"""The frozen CLIP teacher (open_clip): image embeddings, text tower, internals, identity."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from retrofit_agent.contract.bundle import InputSpec
from retrofit_agent.contract.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "model_configs"
# open_clip made its transformers batch-first in 2.26 (mlfoundations/open_clip#906); before,
# blocks ran sequence-first (L, N, D) and the hooks below would read tokens as images.
OPEN_CLIP_FLOOR = (2, 26)
_registered = False


def check_open_clip(version: str | None = None) -> None:
    """Refuse an open_clip older than :data:`OPEN_CLIP_FLOOR` with one line."""
    version = version if version is not None else getattr(open_clip, "__version__", "0")
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m.group(1)), int(m.group(2))) < OPEN_CLIP_FLOOR:
        floor = ".".join(map(str, OPEN_CLIP_FLOOR))
        raise ConfigError(
            f"open_clip_torch {version} is older than {floor} (its transformer runs sequence-first, which the teacher "
            f"hooks do not read); pip install 'open_clip_torch>={floor}'"
        )


def register_local_configs() -> None:
    """Make the repo's small open_clip configs (e.g. ``retrofit-tiny-clip``) known by name."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def teacher_view(model: nn.Module) -> InputSpec:
    """The input an open_clip model gets as a teacher: its size and CLIP mean/std, resized like the student's.

    open_clip's eval transform resizes the short side and centre-crops; we stretch the
    whole frame instead, exactly as the student's spec does, so the 224 px teacher view
    and the 300 px student view show the same content (only the sampling differs). The
    world teacher trains on this same view (``teacher_train/stream.py``).
    """
    pp = model.visual.preprocess_cfg
    size = pp.get("size", 224)
    side = int(size) if isinstance(size, int) else int(size[0])
    return InputSpec(
        name="teacher",
        height=side,
        width=side,
        layout="NCHW",
        dtype="float32",
        color="RGB",
        mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
        resize="stretch",
        interpolation="area",
    )


class Teacher(nn.Module):
    """An open_clip model by name, ``pretrained`` a published tag or a local checkpoint path.

    Always frozen and in eval mode; ``seed`` initialises weights reproducibly when no
    pretrained weights are given (tests and the untrained reference bundle only).
    """

    def __init__(self, model_name: str, pretrained: str | None = None, seed: int | None = None) -> None:
        super().__init__()
        check_open_clip()
        register_local_configs()
        if seed is not None:
            torch.manual_seed(seed)
        self.model_name = model_name
        self.pretrained = pretrained
        self.model = open_clip.create_model(model_name, pretrained=pretrained)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model.eval().requires_grad_(False)
        self._spec = teacher_view(self.model)
        self.image_size: int = self._spec.height
        self.mean: tuple[float, float, float] = self._spec.mean
        self.std: tuple[float, float, float] = self._spec.std
        self._weights_sha256: str | None = None

    def train(self, mode: bool = True) -> Teacher:  # the teacher never trains
        return super().train(False)

    @property
    def identity(self) -> str:
        tag = self.pretrained if self.pretrained else "seeded-untrained"
        if tag and Path(tag).exists():
            tag = Path(tag).name
        return f"{self.model_name}/{tag}"

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[1])
            if self.model.text_projection is not None
            else int(self.model.visual.output_dim)
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

    def weights_sha256(self) -> str:
        """sha256 of every weight (name, dtype, shape, bytes): what the teacher cache is keyed on.

        The fingerprint covers the projections only; two checkpoints of one model can share
        them and still map images differently.
        """
        if self._weights_sha256 is None:
            h = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                t = tensor.detach().cpu().contiguous().reshape(-1)
                h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}\n".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())  # raw bytes: any dtype, bf16 included
            self._weights_sha256 = h.hexdigest()
        return self._weights_sha256

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
        """The teacher's own view (:func:`teacher_view`)."""
        return self._spec

    @property
    def grid_size(self) -> tuple[int, int]:
        """The ViT's patch-token grid (16x16 for ViT-L/14 at 224 px); a class token comes first."""
        g = self.model.visual.grid_size
        return (int(g[0]), int(g[1]))

    @property
    def dense_grid(self) -> tuple[int, int]:
        """(gh, gw) of :meth:`encode_dense`: the ViT's patch grid, or the ResNet's last feature map (side / 32)."""
        visual = self._dense_tower()
        if getattr(visual, "attnpool", None) is not None:
            side = self.image_size // 32  # ModifiedResNet: /4 stem, /2 in each of layers 2-4
            return (side, side)
        return self.grid_size

    def check_dense(self) -> None:
        """Refuse (one line) a tower :meth:`encode_dense` cannot read per-patch embeddings from."""
        self._dense_tower()

    def _dense_tower(self) -> Any:  # open_clip's towers: attributes by duck typing
        """The vision tower, if :meth:`encode_dense` knows how to read per-position embeddings from it."""
        visual: Any = self.model.visual
        is_vit = getattr(visual, "transformer", None) is not None and hasattr(visual, "ln_post")
        if is_vit and getattr(visual, "attn_pool", None) is None:
            return visual
        if getattr(visual, "attnpool", None) is not None and hasattr(visual.attnpool, "v_proj"):
            return visual
        raise ConfigError(
            f"teacher {self.model_name!r}: no per-patch embeddings (needs an open_clip ViT without an attentional "
            "pooler, or a ModifiedResNet with attention pooling); set loss.dense to 0"
        )

    @torch.no_grad()
    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """(N, gh, gw, D) unit embeddings, one per patch, in the space of :meth:`encode_image` (MaskCLIP).

        ViT: the last block's patch tokens through ``ln_post`` and the visual projection
        ``proj``, the path the class token takes to become the image embedding. ModifiedResNet:
        each position of the last feature map (plus its positional embedding) through the
        attention pool's value and output projections, skipping the query-key attention, so a
        cell is what attention pooling would return if it attended to that cell alone.
        """
        return self.encode_image_and_dense(images)[1]

    @torch.no_grad()
    def encode_image_and_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_image` and :meth:`encode_dense` from one pass of the tower."""
        seen: dict[str, torch.Tensor] = {}
        hook = self._tap_dense(seen)
        try:
            embedding = nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
        finally:
            hook.remove()
        return embedding, self._dense_from(seen["dense"])

    def _tap_dense(self, seen: dict[str, torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
        """A hook that puts the tower's last per-position features in ``seen["dense"]`` during a forward."""
        visual = self._dense_tower()
        handle: torch.utils.hooks.RemovableHandle
        if getattr(visual, "attnpool", None) is not None:  # its input: the (N, C, h, w) map
            handle = visual.attnpool.register_forward_pre_hook(lambda m, inp: seen.__setitem__("dense", inp[0]))
        else:
            handle = visual.transformer.register_forward_hook(lambda m, inp, out: seen.__setitem__("dense", out))
        return handle

    def _dense_from(self, raw: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, gh, gw, D) embeddings from what :meth:`_tap_dense` caught (unit vectors unless told otherwise)."""
        visual = self._dense_tower()
        if getattr(visual, "attnpool", None) is not None:
            out = _attnpool_values(visual.attnpool, raw)
        else:
            out = _vit_patch_embeddings(visual, raw, self.grid_size)
        out = out.float()
        return nn.functional.normalize(out, dim=-1) if normalize else out

    @property
    def width(self) -> int:
        """Token width of the vision transformer (1024 for ViT-L/14)."""
        return int(self.model.visual.transformer.width)

    @property
    def num_heads(self) -> int:
        return int(self._blocks()[0].attn.num_heads)

    def _blocks(self) -> nn.ModuleList:
        transformer = getattr(getattr(self.model, "visual", None), "transformer", None)
        blocks = getattr(transformer, "resblocks", None)
        if blocks is None or not hasattr(blocks[0], "attn") or not hasattr(blocks[0], "ln_1"):
            raise ConfigError(
                f"teacher {self.model_name!r} is not a ViT with open_clip attention blocks; the PCA/GL losses need one "
                "(set loss.pca_attention, loss.pca_value and loss.gl to 0 to use the embedding and affinity losses only)"
            )
        if not hasattr(transformer, "batch_first"):
            raise ConfigError(
                f"teacher {self.model_name!r}: its transformer does not say whether it runs batch-first; "
                "upgrade open_clip_torch"
            )
        return blocks

    def check_spatial(self, layers: Sequence[int], need_qk: bool) -> None:
        """Refuse (one line) block indices out of range and blocks whose Q/K the hooks cannot reproduce.

        The hooks capture a block's ``ln_1`` output and recompute Q, K, V with its own
        in-projection. Blocks that transform Q/K further — QK-norm (``attn.ln_q``/``ln_k``)
        or scaled cosine attention (``attn.logit_scale``) — would give other numbers.
        """
        blocks = self._blocks()
        for layer in layers:
            if not -len(blocks) <= layer < len(blocks):
                raise ConfigError(f"teacher.layer: {layer} is outside the teacher's {len(blocks)} blocks")
            if not need_qk:
                continue
            attn = blocks[layer].attn
            reason = None
            if getattr(attn, "in_proj_weight", None) is None:
                reason = "has no packed in-projection (separate Q/K/V weights)"
            elif not isinstance(getattr(attn, "ln_q", nn.Identity()), nn.Identity) or not isinstance(
                getattr(attn, "ln_k", nn.Identity()), nn.Identity
            ):
                reason = "uses QK-norm"
            elif getattr(attn, "logit_scale", None) is not None:
                reason = "uses scaled cosine attention"
            if reason:
                raise ConfigError(
                    f"teacher {self.model_name!r} block {layer} {reason}: the hooks cannot reproduce its Q/K; use "
                    "another teacher or set loss.pca_attention and loss.pca_value to 0"
                )

    @torch.no_grad()
    def forward_features(
        self, images: torch.Tensor, layers: int | Sequence[int] = -1, qkv: bool = True, dense: bool = False
    ) -> TeacherFeatures:
        """Embedding plus, for each block in ``layers``, its patch tokens and per-head Q/K/V, through forward hooks;
        with ``dense``, also :meth:`encode_dense`'s per-patch embeddings from the same pass. ``layers=()`` asks for
        no block (the embedding and, with ``dense``, the patch embeddings only: a ResNet teacher can give those).

        open_clip calls ``nn.MultiheadAttention`` with ``need_weights=False``, so the
        attention map is not observable as an output. We capture the block's attention
        input (``ln_1``'s output) instead and recompute Q, K, V with the block's own
        in-projection: the same numbers the block used (:meth:`check_spatial` refuses
        blocks where they are not).
        """
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        blocks = self._blocks() if layers else nn.ModuleList()
        seen: dict[tuple[str, int], torch.Tensor] = {}
        caught: dict[str, torch.Tensor] = {}
        hooks = [self._tap_dense(caught)] if dense else []
        for i, layer in enumerate(layers):
            block = blocks[layer]
            hooks.append(
                block.ln_1.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(("attn_in", i), out))
            )
            hooks.append(block.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(("tokens", i), out)))
        try:
            embedding = nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
        finally:
            for h in hooks:
                h.remove()
        seq_first = bool(layers) and not self.model.visual.transformer.batch_first
        out = []
        for i, layer in enumerate(layers):
            tokens, attn_in = seen[("tokens", i)], seen[("attn_in", i)]
            if seq_first:
                tokens, attn_in = tokens.transpose(0, 1), attn_in.transpose(0, 1)
            q = k = v = None
            if qkv:
                attn = blocks[layer].attn
                q, k, v = (
                    _heads(t, attn.num_heads)
                    for t in nn.functional.linear(attn_in, attn.in_proj_weight, attn.in_proj_bias)
                    .float()
                    .chunk(3, dim=-1)
                )
            out.append(LayerFeatures(tokens=tokens.float(), q=q, k=k, v=v))
        grid = self.grid_size if layers else self.dense_grid
        cells = self._dense_from(caught["dense"]) if dense else None
        return TeacherFeatures(embedding=embedding, layers=tuple(out), grid=grid, dense=cells)


@dataclass(frozen=True)
class LayerFeatures:
    """One block's outputs. Token tensors may keep the class token first (live) or not (cached)."""

    tokens: torch.Tensor  # (B, [1 +] h*w, width): the block's output
    q: torch.Tensor | None = None  # (B, heads, [1 +] h*w, head_dim)
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass(frozen=True)
class TeacherFeatures:
    """What the projectors align to: the embedding and one :class:`LayerFeatures` per block."""

    embedding: torch.Tensor  # (B, D) L2-normalised
    layers: tuple[LayerFeatures, ...]
    grid: tuple[int, int]
    dense: torch.Tensor | None = None  # (B, gh, gw, D) unit per-patch embeddings (Teacher.encode_dense)

    def patch(self, t: torch.Tensor) -> torch.Tensor:
        """Drop the class token: the student's feature map has no counterpart for it."""
        n = self.grid[0] * self.grid[1]
        return t[..., t.shape[-2] - n :, :]

    # One-layer conveniences (the first configured block).
    @property
    def tokens(self) -> torch.Tensor:
        return self.layers[0].tokens

    @property
    def q(self) -> torch.Tensor | None:
        return self.layers[0].q

    @property
    def k(self) -> torch.Tensor | None:
        return self.layers[0].k

    @property
    def v(self) -> torch.Tensor | None:
        return self.layers[0].v


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def _vit_patch_embeddings(visual: Any, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The transformer's output tokens → (N, gh, gw, D): ``ln_post`` then ``proj`` on every patch token.

    ``ln_post`` normalises each token on its own, so applying it to all of them is what the
    class token gets (and, with ``final_ln_after_pool``, what the pooled token gets).
    """
    if not visual.transformer.batch_first:
        tokens = tokens.transpose(0, 1)
    n = grid[0] * grid[1]
    patches = visual.ln_post(tokens[:, tokens.shape[1] - n :])  # drop the class (and any prefix) token
    if visual.proj is not None:
        patches = patches @ visual.proj
    out: torch.Tensor = patches.reshape(patches.shape[0], grid[0], grid[1], -1)
    return out


def _attnpool_values(pool: Any, fmap: torch.Tensor) -> torch.Tensor:
    """ModifiedResNet's last (N, C, h, w) map → (N, h, w, D) through the pool's v_proj and c_proj (MaskCLIP).

    Each position keeps its own positional embedding (resampled if the map is not the
    pool's trained size), as its value vector inside the attention pool has it.
    """
    n, c, h, w = fmap.shape
    pos = pool.positional_embedding[1:]  # the first row belongs to the mean token
    side = round((pos.shape[0]) ** 0.5)
    pos = pos.reshape(side, side, c)
    if (side, side) != (h, w):
        pos = nn.functional.interpolate(pos.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False)[
            0
        ].permute(1, 2, 0)
    x = fmap.permute(0, 2, 3, 1) + pos.to(fmap.dtype)
    out: torch.Tensor = pool.c_proj(pool.v_proj(x))
    return out
