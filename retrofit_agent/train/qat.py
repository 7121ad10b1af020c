"""Quantization-aware fine-tuning: the student learns to live with its int8 model's rounding.

Static int8 of an EfficientNet student loses most where rounding compounds through the
depthwise layers and where a few activations are far larger than the rest (README, "The
reference bundle"). Training under the rounding recovers it (Jacob et al., CVPR 2018, the
scheme torch.ao and NVIDIA's pytorch-quantization implement). :func:`attach` puts a fake
quantizer on every tensor onnxruntime's static QDQ quantizes in the exported graph: each Conv's
output (BatchNorm is folded into it there, so in torch the BatchNorm's output), each Sigmoid,
Mul (SiLU is exported as ``x * sigmoid(x)``), Add (the residual sum), ReduceMean (the
squeeze-excitation mean), the global average pool, the head's Gemms and its GELU (Erf, Add,
Mul), for the pooled row and for the cells apart, and the input. They are forward hooks, so the
module tree and its state dict stay the student's own: :func:`detach` leaves a plain Student
that ``export`` takes unchanged.

Each quantizer is per-tensor asymmetric uint8 (onnxruntime's activations) over the range
``quantize --method minmax-mean`` calibrates: the mean of each picture's own min and max
(:class:`FakeQuant`). Weights stay float in training: per-channel int8 weights cost little, and
folding BatchNorm into them during training is not worth its complexity here.

:func:`finetune` trains the student to match its own float outputs (embedding and cells) under
fake quantization, self-distillation, which is the gate's own measure (``quantize``: cosine and
top-1 agreement between int8 and fp32). BatchNorm statistics are frozen (the folded int8 graph
has fixed ones). Then ``export`` and ``quantize --method minmax-mean`` run as for any student.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.train.student import Student

log = structlog.get_logger("retrofit_agent.train.qat")

QMAX = 255  # uint8 activations, as quantize writes them


class FakeQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake quantization over a tracked [min, max] range.

    The range is each picture's own min and max, averaged over the pictures of a batch, then
    averaged over batches (exponentially, the first batch setting it): what ``quantize --method
    minmax-mean`` calibrates (onnxruntime's MinMax with its moving average: the mean of every
    calibration picture's min and max, rather than the extremes over all of them, which a few
    rare activations would stretch until every other value had a handful of levels). It always
    includes 0, as onnxruntime's does, so that zero is exact. In eval mode the range is fixed.
    Gradients pass straight through inside the range (``torch.fake_quantize_per_tensor_affine``).

    ``forward(x, pictures)``: the range is taken per picture over ``x.reshape(pictures, -1)``;
    by default each row of the first dimension is a picture.
    """

    def __init__(self, momentum: float = 0.05) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, pictures: int | None = None) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                per = x.detach().float().reshape(pictures or (x.shape[0] if x.ndim > 1 else 1), -1)
                lo, hi = per.amin(dim=1).mean().clamp(max=0), per.amax(dim=1).mean().clamp(min=0)
                if int(self.seen) == 0:
                    self.lo.copy_(lo)
                    self.hi.copy_(hi)
                else:
                    self.lo.lerp_(lo, self.momentum)
                    self.hi.lerp_(hi, self.momentum)
                self.seen += 1
        if int(self.seen) == 0:  # never observed: nothing to quantize to yet
            return x
        scale = max(float(self.hi - self.lo) / QMAX, 1e-8)
        zero_point = int(min(max(round(-float(self.lo) / scale), 0), QMAX))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, QMAX)


@dataclass
class Attached:
    """The quantizers :func:`attach` placed, by the tensor they quantize, and its hook handles."""

    quantizers: nn.ModuleDict
    handles: list[Any]

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {k: (float(q.lo), float(q.hi)) for k, q in self.quantizers.items()}  # type: ignore[arg-type]


def attach(student: Student, momentum: float = 0.05) -> Attached:
    """Hook fake quantizers onto ``student`` where onnxruntime's QDQ quantizes its export.

    Knows timm's EfficientNet/MobileNet family (``BatchNormAct2d``, ``SqueezeExcite``, blocks
    with ``has_skip``), the family our students come from; another backbone is refused in one
    line rather than half-covered.
    """
    from timm.layers.norm_act import BatchNormAct2d
    from timm.models._efficientnet_blocks import SqueezeExcite

    bb = student.backbone
    if not any(isinstance(m, BatchNormAct2d) for m in bb.modules()) or not hasattr(bb, "conv_stem"):
        raise ConfigError(
            f"qat: backbone {student.backbone_name!r} is not from timm's EfficientNet/MobileNet family "
            "(conv_stem, BatchNormAct2d blocks); quantization-aware fine-tuning knows only that family"
        )
    quantizers = nn.ModuleDict()
    handles: list[Any] = []

    def new(name: str) -> FakeQuant:
        q = FakeQuant(momentum)
        quantizers[name.replace(".", "/")] = q
        return q

    def on_output(module: nn.Module, name: str) -> None:
        q = new(name)
        handles.append(module.register_forward_hook(lambda m, i, out: q(out)))

    def on_input(module: nn.Module, name: str) -> None:
        q = new(name + ".in")
        handles.append(module.register_forward_pre_hook(lambda m, args: (q(args[0]), *args[1:])))

    def silu(module: nn.Module, name: str) -> None:
        # x * sigmoid(x): onnxruntime quantizes the Sigmoid's output and the Mul's.
        s, o = new(name + ".sigmoid"), new(name + ".mul")
        module.inplace = False  # type: ignore[assignment]  # the hook reads the input again
        handles.append(module.register_forward_hook(lambda m, i, out: o(i[0] * s(torch.sigmoid(i[0])))))

    batch = {"pictures": 0}  # set by the stem's hook at the start of every forward

    def stem(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        batch["pictures"] = int(args[0].shape[0])
        return (stem_q(args[0]), *args[1:])

    def head_path(x: torch.Tensor) -> tuple[str, int]:
        return ("pooled", x.shape[0]) if x.shape[0] == batch["pictures"] else ("cells", batch["pictures"])

    def head_output(module: nn.Module, name: str) -> None:
        qs = {p: new(f"{name}.{p}") for p in ("pooled", "cells")}

        def hook(m: nn.Module, i: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            which, pictures = head_path(out)
            return qs[which](out, pictures)

        handles.append(module.register_forward_hook(hook))

    def gelu(module: nn.Module, name: str) -> None:
        # The exact GELU exports as Div, Erf, Add, Mul, Mul: all but the Div are quantized.
        qs = {p: [new(f"{name}.{part}.{p}") for part in ("erf", "add", "mul", "mul_1")] for p in ("pooled", "cells")}

        def hook(m: nn.Module, i: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = i[0]
            which, n = head_path(x)
            e, a, m1, m2 = qs[which]
            return m2(m1(x * a(e(torch.erf(x / math.sqrt(2.0)), n) + 1.0, n), n) * 0.5, n)

        handles.append(module.register_forward_hook(hook))

    stem_q = new("backbone.conv_stem.in")
    handles.append(bb.conv_stem.register_forward_pre_hook(stem))
    for name, mod in bb.named_modules():
        path = f"backbone.{name}"
        if isinstance(mod, BatchNormAct2d):
            on_output(mod.drop, path + ".bn")  # the Conv output once BatchNorm is folded into it
            if isinstance(mod.act, nn.SiLU):
                silu(mod.act, path + ".act")
            elif not isinstance(mod.act, nn.Identity):
                raise ConfigError(f"qat: {path} has activation {type(mod.act).__name__}; only SiLU is modelled")
        elif isinstance(mod, SqueezeExcite):
            on_input(mod.conv_reduce, path + ".mean")
            on_output(mod.conv_reduce, path + ".conv_reduce")
            silu(mod.act1, path + ".act1")
            on_output(mod.conv_expand, path + ".conv_expand")
            on_output(mod.gate, path + ".gate")
            on_output(mod, path + ".mul")
        elif getattr(mod, "has_skip", False):
            on_output(mod, path + ".add")
    on_output(bb.global_pool, "backbone.global_pool")
    # The head runs twice per dense forward: on the pooled (N, C) rows and on the (N*H'*W', C) cells.
    # The export has a Gemm (and a GELU) for each, quantized apart; so here, told apart by their rows
    # against the batch the stem saw, and the cells' range taken per picture, over all its cells.
    for name, mod in student.head.named_modules():
        if isinstance(mod, nn.Linear):
            head_output(mod, f"head.{name}")
        elif isinstance(mod, nn.GELU):
            if mod.approximate != "none":
                raise ConfigError("qat: only the exact GELU is modelled")
            gelu(mod, f"head.{name}")
    return Attached(quantizers, handles)


def detach(attached: Attached) -> None:
    for h in attached.handles:
        h.remove()
    attached.handles.clear()


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers use their running statistics (the folded int8 graph's), without eval()
    on their children: the fake quantizer hooked on a BatchNormAct2d's ``drop`` keeps learning."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.training = False


# --------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class QatSettings:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 10
    calibration_batches: int = 8  # batches that set the ranges before the first step
    cell_weight: float = 1.0  # the cells' cosine loss beside the embedding's
    momentum: float = 0.05
    seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 25


def _lr(s: QatSettings, step: int) -> float:
    warm = min(1.0, step / max(1, s.warmup_steps))
    return s.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, s.steps) / s.steps))


def _cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1 - (a * b).sum(-1)).mean()


def _outputs(student: Student, x: torch.Tensor, dense: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if dense:
        emb, cells = student.forward_dense(x)
        return emb, cells
    return student(x), None


def simulated_agreement(
    student: Student, reference: Student, attached: Attached, x: torch.Tensor, dense: bool
) -> dict[str, float]:
    """Mean cosine of the fake-quantized student to the float reference on ``x`` (and of its cells)."""
    was = student.training
    student.eval()
    try:
        with torch.no_grad():
            e, c = _outputs(student, x, dense)
            re, rc = _outputs(reference, x, dense)
    finally:
        student.train(was)
        freeze_batchnorm(student)
    out = {"sim_int8_cosine": float((e * re).sum(-1).mean())}
    if c is not None and rc is not None:
        out["sim_int8_cell_cosine"] = float((c * rc).sum(-1).mean())
    return out


def finetune(
    student: Student,
    batches: Callable[[np.random.Generator], torch.Tensor],
    held_out: torch.Tensor,
    settings: QatSettings,
    out_dir: Path,
    dense: bool,
    on_metrics: Callable[[dict[str, Any]], None] = lambda m: None,
) -> tuple[Student, dict[str, Any]]:
    """Fine-tune ``student`` (in place) under fake quantization against a frozen copy of itself.

    ``batches(rng)`` gives one preprocessed (N, 3, H, W) batch. Resumable: every
    ``checkpoint_every`` steps the weights, optimizer, quantizer ranges and random state go to
    ``out_dir/checkpoint.pt`` (atomically); a run that finds one continues from it. Returns the
    student with its hooks removed and a summary (first and last simulated agreement).
    """
    reference = copy.deepcopy(student).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    attached = attach(student, settings.momentum)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=settings.lr, weight_decay=0.0)
    ckpt = out_dir / "checkpoint.pt"
    rng = np.random.default_rng(settings.seed)
    step, first = 0, None
    student.train()
    freeze_batchnorm(student)
    if ckpt.is_file():
        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign: say which file, not a pickle traceback
            raise ConfigError(f"qat: cannot read {ckpt} ({type(e).__name__}); delete it to start over") from None
        if saved.get("settings") != asdict(settings):
            raise ConfigError(f"qat: {ckpt} was written with other settings; delete it or use another --out")
        student.load_state_dict(saved["student"])
        reference.load_state_dict(saved["reference"])
        attached.quantizers.load_state_dict(saved["quantizers"])
        opt.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = saved["rng"]
        step, first = int(saved["step"]), saved["first"]
        log.info("qat_resumed", step=step, checkpoint=str(ckpt))
    else:
        with torch.no_grad():  # set every range before the first step, as calibration would
            for _ in range(settings.calibration_batches):
                _outputs(student, batches(rng), dense)
        first = simulated_agreement(student, reference, attached, held_out, dense)
        on_metrics({"step": 0, "kind": "eval", **first})
    t0 = time.monotonic()
    while step < settings.steps:
        step += 1
        x = batches(rng)
        with torch.no_grad():
            re, rc = _outputs(reference, x, dense)
        e, c = _outputs(student, x, dense)
        loss = _cosine_loss(e, re)
        parts = {"embedding": loss.item()}
        if c is not None and rc is not None and settings.cell_weight > 0:
            cell = _cosine_loss(c, rc)
            parts["cells"] = cell.item()
            loss = loss + settings.cell_weight * cell
        for g in opt.param_groups:
            g["lr"] = _lr(settings, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        on_metrics(
            {
                "step": step,
                "kind": "train",
                "loss": loss.item(),
                **parts,
                "lr": _lr(settings, step),
                "elapsed_s": round(time.monotonic() - t0, 1),
            }
        )
        if step % settings.eval_every == 0 or step == settings.steps:
            on_metrics(
                {"step": step, "kind": "eval", **simulated_agreement(student, reference, attached, held_out, dense)}
            )
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            tmp = ckpt.with_name(ckpt.name + ".tmp")
            torch.save(
                {
                    "settings": asdict(settings),
                    "step": step,
                    "first": first,
                    "student": student.state_dict(),
                    "reference": reference.state_dict(),
                    "quantizers": attached.quantizers.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": rng.bit_generator.state,
                },
                tmp,
            )
            os.replace(tmp, ckpt)
    last = simulated_agreement(student, reference, attached, held_out, dense)
    ranges = attached.ranges()
    detach(attached)
    student.eval()
    (out_dir / "ranges.json").write_text(json.dumps(ranges, indent=1) + "\n")
    return student, {"steps": step, "first": first, "last": last, "quantizers": len(ranges)}


def frame_batches(
    frames: list[np.ndarray], preprocess: Callable[[list[np.ndarray]], np.ndarray], batch_size: int
) -> Callable[[np.random.Generator], torch.Tensor]:
    """Random batches of ``frames`` through the runtime's own preprocessing, half of them mirrored."""

    def draw(rng: np.random.Generator) -> torch.Tensor:
        idx = rng.choice(len(frames), size=min(batch_size, len(frames)), replace=False)
        x = torch.from_numpy(preprocess([frames[i] for i in idx]))
        return x.flip(-1) if rng.random() < 0.5 else x

    return draw
