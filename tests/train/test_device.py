"""Runs on an accelerator: nothing leaves the device for numpy without ``.cpu()``.

On CUDA machines a one-step smoke run (bf16 autocast, gradient checkpointing, a prompts
file, the cache) runs for real. Everywhere, the same code paths run with the teacher's
and the student's outputs turned into :class:`offdevice.OffCpu` tensors, which refuse
``.numpy()`` exactly as CUDA tensors do; the bank builder's old ``mean.numpy()`` (a
crash at start-up on every GPU run with a prompts file) fails this test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from offdevice import MESSAGE, OffCpu, off_cpu  # noqa: E402

from retrofit_agent.contract.prompts import load_prompts  # noqa: E402
from retrofit_agent.train.student import Student  # noqa: E402
from retrofit_agent.train.teacher import Teacher  # noqa: E402
from train_helpers import REPO, images, tiny_config  # noqa: E402,F401  (images is a fixture)

pytestmark = [pytest.mark.train]
PROMPTS = REPO / "models" / "prompts" / "automotive.toml"


@pytest.fixture
def outputs_off_cpu(monkeypatch):
    """Every teacher and student output behaves like a CUDA tensor."""
    for cls, names in (
        (Teacher, ("encode_image", "encode_text", "forward_features")),
        (Student, ("forward", "forward_with_features")),
    ):
        for name in names:
            real = getattr(cls, name)
            monkeypatch.setattr(cls, name, lambda self, *a, _real=real, **k: off_cpu(_real(self, *a, **k)))


def test_off_cpu_tensors_refuse_numpy_like_cuda_and_the_meta_device_cannot_tell():
    x = torch.ones(3).as_subclass(OffCpu)
    y = torch.nn.functional.normalize(torch.cat([x, x]) * 2, dim=-1)
    assert isinstance(y, OffCpu)
    with pytest.raises(TypeError, match="cuda:0 device type tensor to numpy"):
        y.numpy()
    assert y.cpu().numpy().shape == (6,) and type(y.to("cpu")) is torch.Tensor
    assert float(y.sum()) > 0  # .item() works on CUDA too (it synchronises)
    # Why not the meta device: it refuses .cpu() as well, so correct code fails there too.
    with pytest.raises(NotImplementedError):
        torch.empty(3, device="meta").cpu()
    assert MESSAGE.startswith("can't convert cuda:0")


def test_the_text_bank_is_built_from_device_embeddings(outputs_off_cpu):
    from retrofit_agent.train.bank import encode_prompt_set

    teacher = Teacher("retrofit-micro-clip", None, seed=0)
    assert isinstance(teacher.encode_text(["a road"]), OffCpu)
    emb, groups, labels = encode_prompt_set(teacher, load_prompts(PROMPTS))
    assert emb.shape == (len(labels), teacher.embed_dim) and len(groups) == len(labels)


@pytest.mark.parametrize("cached", [False, True], ids=["live-teacher", "teacher-cache"])
def test_a_training_step_and_evaluation_keep_device_tensors_on_the_device(
    tmp_path: Path, images: Path, outputs_off_cpu, cached
):
    from retrofit_agent.train.engine import Distiller

    cfg = tiny_config(
        tmp_path / "run",
        [str(images)],
        data={"max_images": 48, "holdout": 16, "batch_size": 8},
        cache={"enabled": cached, "views": 2, "spatial": True, "shard_size": 20},
        optim={"max_steps": 2},
        run={"eval_every": 1, "checkpoint_every": 1, "log_every": 1},
    )
    summary = Distiller(cfg).fit()
    assert summary["steps"] == 2 and summary["final"]["heldout_top1_agreement"] >= 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "train"] == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cached", [False, True], ids=["live-teacher", "teacher-cache"])
def test_cuda_smoke_one_step_with_bf16_autocast_and_gradient_checkpointing(tmp_path: Path, images: Path, cached):
    from retrofit_agent.train.engine import Distiller

    cfg = tiny_config(
        tmp_path / "run",
        [str(images)],
        data={"max_images": 48, "holdout": 16, "batch_size": 8},
        student={"grad_checkpointing": True},
        bank={"prompts_file": str(PROMPTS)},
        cache={"enabled": cached, "views": 2, "spatial": True, "shard_size": 20},
        optim={"max_steps": 1},
        run={"device": "cuda", "precision": "bf16", "eval_every": 1},
    )
    d = Distiller(cfg)
    assert d.device.type == "cuda" and d.precision.dtype == torch.bfloat16 and d.student.backbone.grad_checkpointing
    assert d.bank.embeddings.device.type == "cuda"
    summary = d.fit()
    assert summary["steps"] == 1 and summary["final"]["heldout_cosine"] == summary["final"]["heldout_cosine"]  # not NaN
    assert all(torch.isfinite(p).all() for p in d.student.parameters())
