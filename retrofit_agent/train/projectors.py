"""Training-only modules that let a CNN student learn from a ViT teacher's internals.

Cross-architecture projectors after Liu et al., "Cross-Architecture Knowledge
Distillation" (ACCV 2022): a Partially Cross Attention (PCA) projector and a Group-wise
Linear (GL) projector; plus the small discriminator of multi-view robust training. None of
them is exported: the bundle holds the student only.

PCA comes in two forms (``projectors.pca_form``): the paper's (attention output and value
relation, eq. 4) and an earlier simplified one (attention maps); :func:`pca_losses` says
which term is which. All loss arithmetic runs in float32, outside autocast.

Grids. A CNN feature map (e.g. 19x19 at stride 16 or 10x10 at stride 32 for
EfficientNet-B3 at 300 px) and a ViT token grid (16x16 patch tokens plus one class token
for ViT-L/14 at 224 px) do not line up. :func:`resample_map` resizes the CNN map to the
teacher's patch grid with bilinear interpolation (antialiased when shrinking, so a 19x19
map is averaged rather than aliased onto 16x16); the class token is dropped on the
teacher's side, because no CNN location corresponds to it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from retrofit_agent.train.zeroshot import fp32


def resample_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) → (B, C, *grid), bilinear, antialiased when downsampling."""
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    shrink = x.shape[-2] > grid[0] or x.shape[-1] > grid[1]
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=False, antialias=shrink)


def attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) over (B, heads, N, d) tensors, in float32."""
    with fp32(q.device):
        q, k = q.float(), k.float()
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V: what an attention head passes on (Liu et al. eq. 1-2), float32."""
    with fp32(q.device):
        return attention_map(q, k) @ v.float()


def value_relation(v: torch.Tensor) -> torch.Tensor:
    """V Vᵀ / √d (Liu et al. eq. 4, second term), float32."""
    with fp32(v.device):
        v = v.float()
        return v @ v.transpose(-2, -1) / math.sqrt(v.shape[-1])


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared L2 between rows of two (B, heads, N, N) row-stochastic maps, mean over rows.

    Summing over the N keys (instead of a plain MSE, which divides by N once more) keeps
    the loss on the scale of one distribution's distance, independent of the grid size.
    """
    with fp32(student.device):
        return (student.float() - teacher.float()).pow(2).sum(-1).mean()


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (the ‖·‖² of the paper's equations, per element)."""
    with fp32(student.device):
        return (student.float() - teacher.float()).pow(2).mean()


def pca_losses(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    form: str = "paper",
    student_v: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The PCA projector's two terms; both are zero when the student's Q, K, V equal the teacher's.

    ``q, k, v`` are the operands after substitution, ``student_v`` the projector's own V.

    - ``"paper"`` (Liu et al. eq. 4): ``pca_attention`` = ‖softmax(Q_T K_Tᵀ/√d) V_T −
      softmax(g(Q_S) g(K_S)ᵀ/√d) g(V_S)‖², the attention *output*; ``pca_value`` =
      ‖V_T V_Tᵀ/√d − V_S V_Sᵀ/√d‖² with the student's own V. Both mean squared errors.
    - ``"maps"`` (the earlier simplified form): ``pca_attention`` compares the attention
      *maps* softmax(QKᵀ/√d) and ``pca_value`` the maps softmax(VVᵀ/√d) (MiniLM's value
      relation), both with substituted operands, as :func:`relation_loss`.

    The teacher's attention is over patch tokens only, like the student's: no CNN location
    corresponds to the class token.
    """
    if form == "paper":
        own_v = v if student_v is None else student_v
        return {
            "pca_attention": mse(attention_output(q, k, v), attention_output(tq, tk, tv)),
            "pca_value": mse(value_relation(own_v), value_relation(tv)),
        }
    if form == "maps":
        return {
            "pca_attention": relation_loss(attention_map(q, k), attention_map(tq, tk)),
            "pca_value": relation_loss(attention_map(v, v), attention_map(tv, tv)),
        }
    raise ValueError(f"unknown PCA form {form!r} (paper or maps)")


class PCAProjector(nn.Module):
    """Partially Cross Attention: a CNN map → student Q, K, V in the teacher's head layout.

    Each of Q, K, V comes from its own 3x3 convolution of the (resampled) feature map.
    In training, student entries are replaced by the teacher's with probability
    ``substitute_p`` — each element independently ("element", the paper's g(·) of eq. 3)
    or a whole Q, K or V matrix per image ("matrix") — so the student's attention is
    computed partly with the teacher's operands, which eases the start of training.
    ``form`` picks the loss terms (:func:`pca_losses`).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        heads: int,
        substitute_p: float = 0.5,
        granularity: str = "element",
        form: str = "paper",
    ) -> None:
        super().__init__()
        self.heads, self.substitute_p, self.granularity, self.form = heads, substitute_p, granularity, form
        self.qkv = nn.ModuleList(nn.Conv2d(in_channels, width, 3, padding=1) for _ in range(3))
        self.last_substitution_rate = 0.0

    def project(self, feature_map: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """Student Q, K, V as (B, heads, h*w, width/heads)."""
        x = resample_map(feature_map, grid)
        out = []
        for conv in self.qkv:
            y = conv(x).flatten(2).transpose(1, 2)  # (B, N, width)
            b, n, d = y.shape
            out.append(y.reshape(b, n, self.heads, d // self.heads).transpose(1, 2))
        return out

    def substitute(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """g(·): the teacher's entries where a uniform draw is below ``substitute_p`` (training only), float32."""
        if not self.training or self.substitute_p == 0:
            return student
        shape = (student.shape[0], 1, 1, 1) if self.granularity == "matrix" else student.shape
        mask = torch.rand(shape, device=student.device) < self.substitute_p
        self._substituted += float(mask.float().mean())
        return torch.where(mask, teacher.float(), student.float())

    def forward(
        self, feature_map: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor, tv: torch.Tensor, grid: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        q, k, v = self.project(feature_map, grid)
        self._substituted = 0.0
        gq, gk, gv = self.substitute(q, tq), self.substitute(k, tk), self.substitute(v, tv)
        self.last_substitution_rate = self._substituted / 3 if self.training else 0.0
        return pca_losses(gq, gk, gv, tq, tk, tv, self.form, student_v=v)


class GLProjector(nn.Module):
    """Group-wise Linear: a CNN map → the teacher's patch tokens.

    The (resampled) grid is cut into ``group`` x ``group`` neighbourhoods; all positions
    in one neighbourhood share one linear layer, and each neighbourhood has its own.
    Grids that ``group`` does not divide get smaller groups at the right and bottom edges.
    """

    def __init__(
        self, in_channels: int, width: int, grid: tuple[int, int], group: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.grid, self.group = grid, group
        self.gh, self.gw = math.ceil(grid[0] / group), math.ceil(grid[1] / group)
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.empty(self.gh * self.gw, in_channels, width))
        self.bias = nn.Parameter(torch.zeros(self.gh * self.gw, width))
        bound = 1 / math.sqrt(in_channels)  # what nn.Linear's default init amounts to, per group
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, h*w, width) in the teacher's row-major token order."""
        g, (h, w) = self.group, self.grid
        x = self.dropout(resample_map(feature_map, self.grid))
        x = F.pad(x, (0, self.gw * g - w, 0, self.gh * g - h))
        b, c = x.shape[:2]
        x = x.reshape(b, c, self.gh, g, self.gw, g).permute(0, 2, 4, 3, 5, 1).reshape(b, self.gh * self.gw, g * g, c)
        y = torch.einsum("bgpc,gcd->bgpd", x, self.weight.to(x.dtype)) + self.bias[None, :, None, :].to(x.dtype)
        y = y.reshape(b, self.gh, self.gw, g, g, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, self.gh * g, self.gw * g, -1)
        return y[:, :h, :w].reshape(b, h * w, -1)


class Discriminator(nn.Module):
    """Tells teacher embeddings (label 1) from student embeddings of perturbed views (0)."""

    def __init__(self, dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32(x.device):  # small, and its logits feed log-sigmoids: float32 throughout
            return self.net(x.float()).squeeze(-1)


def discriminator_loss(disc: nn.Module, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The discriminator's own objective; the student's embeddings are detached."""
    real, fake = disc(teacher.detach()), disc(student.detach())
    return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros_like(fake)
    )


def adversarial_loss(disc: nn.Module, student: torch.Tensor) -> torch.Tensor:
    """The student's (non-saturating) objective: make the discriminator say 'teacher'."""
    logits = disc(student)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def ramp(weight: float, epoch: float, ramp_epochs: float) -> float:
    """Linear ramp of the adversarial weight from 0 to ``weight`` over ``ramp_epochs``."""
    return weight if ramp_epochs <= 0 else weight * min(1.0, max(0.0, epoch / ramp_epochs))
