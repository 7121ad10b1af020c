"""Quantization-aware fine-tuning (retrofit-model qat): where its fake quantizers sit, that they
leave the student's own graph behind, that they simulate onnxruntime's int8, and that a run
resumes and refuses what it cannot do in one line."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO

pytestmark = pytest.mark.train

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from retrofit_agent.train import qat  # noqa: E402
from retrofit_agent.train.export import export_onnx  # noqa: E402
from retrofit_agent.train.quantize import QuantSettings, quantize_int8  # noqa: E402
from retrofit_agent.train.student import Student  # noqa: E402

SIZE = 64

# The ONNX op whose output each fake quantizer stands for (the last part of its name).
OP_OF = {
    "bn": "Conv",  # BatchNorm is folded into the Conv before quantization
    "conv_reduce": "Conv",
    "conv_expand": "Conv",
    "sigmoid": "Sigmoid",
    "gate": "Sigmoid",
    "mul": "Mul",
    "add": "Add",
    "global_pool": "GlobalAveragePool",
    "erf": "Erf",
    "mul_1": "Mul",
}


def _student(seed: int = 0, backbone: str = "test_efficientnet") -> Student:
    torch.manual_seed(seed)
    return Student(backbone, embed_dim=32, hidden_dim=64, input_size=SIZE).eval()


def _pictures(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random pictures (a few blobs), normalised about as the runtime does."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return (torch.nn.functional.interpolate(low, size=SIZE, mode="bilinear", align_corners=False) - 0.45) / 0.25


def _calibrate(student: Student, attached: qat.Attached, x: torch.Tensor) -> None:
    student.train()
    qat.freeze_batchnorm(student)
    with torch.no_grad():
        student.forward_dense(x)
    student.eval()


def _op_of(name: str) -> str:
    parts = name.split("/")
    if parts[0] == "head":  # head/net/<i>[/<part>]/<pooled|cells>: a Linear (Gemm) or a GELU's part
        return "Gemm" if len(parts) == 4 else OP_OF[parts[3]]
    if parts[-1] == "in":
        return "INPUT" if parts[-2] == "conv_stem" else "ReduceMean"  # the image; the SE mean feeding conv_reduce
    return OP_OF[parts[-1]]


def test_every_tensor_onnxruntime_quantizes_in_the_backbone_has_a_fake_quantizer(tmp_path: Path):
    """Count by op type: the quantizers against the QuantizeLinear nodes that onnxruntime's static
    QDQ puts on the same student's dense export (the head twice: pooled and per cell). A missing
    one would leave a rounding the fine-tune never sees; an extra one, a rounding the camera never
    does."""
    s = _student()
    attached = qat.attach(s)
    ours = collections.Counter(_op_of(k) for k in attached.quantizers)
    _calibrate(s, attached, _pictures(4))
    qat.detach(attached)
    export_onnx(s, tmp_path / "fp32.onnx", {}, dense=True)
    calib = [x[None].numpy() for x in _pictures(4, seed=1)]
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", "image", calib, QuantSettings())
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    theirs: collections.Counter[str] = collections.Counter()
    for n in graph.node:
        p = producer.get(n.input[0])
        if n.op_type == "QuantizeLinear":
            theirs["INPUT" if p is None else p.op_type] += 1
    # Flatten, Transpose and Reshape only move values: onnxruntime requantizes them with their input's scale.
    for op in ("Flatten", "Transpose", "Reshape"):
        theirs.pop(op, None)
    assert ours == theirs
    assert ours["Conv"] > 10 and ours["Sigmoid"] > 5 and ours["ReduceMean"] > 0 and ours["Gemm"] == 4


def test_detached_the_student_is_its_own_float_self_again():
    s, plain = _student(), _student()
    x = _pictures(2)
    attached = qat.attach(s)
    _calibrate(s, attached, x)
    with torch.no_grad():
        fake = s(x)
    qat.detach(attached)
    with torch.no_grad():
        e, ref = s(x), plain(x)
    assert sorted(s.state_dict()) == sorted(plain.state_dict())
    assert torch.equal(e, ref)
    assert not torch.equal(fake, ref)  # attached, it did round


def test_the_fake_quantizer_rounds_as_onnxruntime_does():
    """The range is the mean of each picture's min and max (quantize --method minmax-mean); one
    uint8 step of it, zero exact, values outside it clipped."""
    q = qat.FakeQuant()
    q.train()
    q(torch.tensor([[-1.5, 1.0], [-0.5, 5.0]]))  # per picture [-1.5, 1] and [-0.5, 5]: range [-1, 3]
    assert float(q.lo) == -1.0 and float(q.hi) == 3.0 and q.seen == 1
    q.eval()
    step = 4.0 / 255  # zero point 64
    y = q(torch.tensor([0.0, 0.3, -1.0, 3.0, 5.0, -4.0]))
    assert y[0] == 0.0
    assert abs(float(y[1]) - round(0.3 / step) * step) < 1e-6
    assert torch.allclose(y[2:], torch.tensor([-64 * step, (255 - 64) * step, (255 - 64) * step, -64 * step]))
    q.train()
    q(torch.ones(2, 8), pictures=1)  # one picture of 16 values: [0, 1]; the range moves 5 % towards it
    assert abs(float(q.lo) - (-1.0 + 0.05 * 1.0)) < 1e-6 and abs(float(q.hi) - (3.0 - 0.05 * 2.0)) < 1e-6


class _Features(torch.nn.Module):
    def __init__(self, student: Student) -> None:
        super().__init__()
        self.backbone = student.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


def _feature_errors(s: Student, tmp_path: Path) -> tuple[float, float]:
    """Relative error of the final feature map under onnxruntime's int8 and under the fake
    quantizers, each against fp32, with ranges from the same batch."""
    import onnxruntime as ort

    x = _pictures(8, seed=2)
    features = _Features(s).eval()
    with torch.no_grad():
        torch.onnx.export(
            features,
            (x,),
            str(tmp_path / "fp32.onnx"),
            input_names=["image"],
            dynamic_axes={"image": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        fp32 = features(x).numpy()
    calib = [p[None].numpy() for p in x]  # one picture at a time, as quantize feeds them
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", "image", calib, QuantSettings("minmax-mean"))
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    int8 = session.run(None, {"image": x.numpy()})[0]
    attached = qat.attach(s, momentum=1.0)  # momentum 1: the ranges of the pictures onnxruntime calibrated on
    _calibrate(s, attached, x)
    with torch.no_grad():
        fake = features(x).numpy()
    qat.detach(attached)

    def rel(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - fp32) / np.linalg.norm(fp32))

    return rel(int8), rel(fake)


def test_its_simulated_int8_loses_what_onnxruntimes_int8_loses(tmp_path: Path):
    """The fake quantizers cost the backbone's final feature map as much as onnxruntime's int8 does,
    on a plain student and on an int8-hostile one that loses more: the fine-tune trains
    against the error the camera will have. (Not bit for bit: onnxruntime also rounds the weights,
    which moves activations across rounding steps; the error's size is what training needs.)"""
    (tmp_path / "plain").mkdir()
    (tmp_path / "hostile").mkdir()
    plain = _feature_errors(_student(seed=3), tmp_path / "plain")
    s = _student(seed=3)
    _make_an_outlier_channel(s)
    hostile = _feature_errors(s, tmp_path / "hostile")
    print(
        f"\n[qat figure] final features, relative error to fp32 (onnxruntime int8, fake): plain {plain}, "
        f"hostile {hostile}"
    )
    for ort_err, fake_err in (plain, hostile):
        assert 0.67 < fake_err / ort_err < 1.5
    assert hostile[0] > 1.3 * plain[0] and hostile[1] > 1.3 * plain[1]


def test_a_finetune_records_its_evals_checkpoints_and_resumes_where_it_stopped(tmp_path: Path):
    """Mechanics on a seeded student (whether it helps is measured on the reference: README, "The
    reference bundle"): evals at step 0 and every eval_every, the ranges written, the run's
    checkpoint taken up by a second run of the same settings, which then changes nothing, and
    other settings refused in one line rather than mixed into the same run."""
    pictures, held = _pictures(16, seed=4), _pictures(4, seed=5)

    def batches(rng: np.random.Generator) -> torch.Tensor:
        return pictures[rng.choice(len(pictures), 4, replace=False)]

    settings = qat.QatSettings(
        steps=6, batch_size=4, lr=1e-4, warmup_steps=2, eval_every=3, checkpoint_every=3, calibration_batches=2
    )
    seen: list[dict] = []
    tuned, summary = qat.finetune(
        _student(seed=1), batches, held, settings, tmp_path, dense=True, on_metrics=seen.append
    )
    assert [m["step"] for m in seen if m["kind"] == "eval"] == [0, 3, 6]
    assert [m["step"] for m in seen if m["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(m["loss"] > 0 and {"embedding", "cells"} <= set(m) for m in seen if m["kind"] == "train")
    assert summary["steps"] == 6 and 0 < summary["last"]["sim_int8_cosine"] <= 1
    assert len(json.loads((tmp_path / "ranges.json").read_text())) == summary["quantizers"]
    assert not tuned._forward_hooks and all(not m._forward_hooks for m in tuned.modules())
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    assert any(not torch.equal(before[k], v) for k, v in _student(seed=1).state_dict().items())  # it did train

    again: list[dict] = []
    resumed, summary2 = qat.finetune(
        _student(seed=1), batches, held, settings, tmp_path, dense=True, on_metrics=again.append
    )
    assert summary2["steps"] == 6 and not [m for m in again if m["kind"] == "train"]
    assert all(torch.equal(before[k], v) for k, v in resumed.state_dict().items())

    with pytest.raises(qat.ConfigError, match="other settings"):
        qat.finetune(_student(seed=1), batches, held, qat.QatSettings(steps=7), tmp_path, dense=True)

    (tmp_path / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(qat.ConfigError, match="cannot read .*checkpoint.pt"):
        qat.finetune(_student(seed=1), batches, held, settings, tmp_path, dense=True)


def _make_an_outlier_channel(s: Student) -> None:
    """Channel 0 of the last block's output 50x larger, and conv_head's weights on it 50x smaller:
    the same float function (bn3 has no activation, conv_head is linear), the range that
    post-training int8 of an EfficientNet meets (README, "The reference bundle")."""
    bb = s.backbone
    last = bb.blocks[-1][-1]
    assert not getattr(last, "has_skip", False)  # a residual sum would carry the scaled channel on unscaled
    with torch.no_grad():
        last.bn3.weight[0] *= 50
        last.bn3.bias[0] *= 50
        bb.conv_head.weight[:, 0] /= 50


def test_a_backbone_outside_the_efficientnet_family_is_refused_in_one_line():
    with pytest.raises(qat.ConfigError, match="EfficientNet/MobileNet family"):
        qat.attach(_student(backbone="resnet10t"))


def test_the_cli_refuses_a_file_that_is_not_a_student(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from retrofit_agent.train.cli import main

    bad = tmp_path / "student.pt"
    bad.write_bytes(b"not a checkpoint")
    images = REPO / "tests/fixtures"
    code = main(
        [
            "qat",
            "--checkpoint",
            str(bad),
            "--images",
            str(images),
            "--held-out",
            str(images),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) >= 1 and "student.pt" in err[-1] and "Traceback" not in "".join(err)
