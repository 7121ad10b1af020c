"""A bundle with a real fp32/int8 pair: built by 'bundle --variants', timed and chosen at start-up."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, SEEDED

pytestmark = [pytest.mark.train, pytest.mark.slow]


@pytest.fixture(scope="module")
def variant_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference int8 model plus the fp32 export (with cells) of the same seeded student it was quantized from."""
    import torch

    from retrofit_agent import __version__
    from retrofit_agent.train.export import export_onnx, onnx_metadata, student_input_spec
    from retrofit_agent.train.reference import TEACHER_NAME
    from retrofit_agent.train.student import Student
    from retrofit_agent.train.teacher import Teacher

    tmp = tmp_path_factory.mktemp("variants")
    teacher = Teacher(TEACHER_NAME, pretrained=None, seed=0)
    torch.manual_seed(0)
    student = Student("efficientnet_b3", embed_dim=teacher.embed_dim).eval()
    meta = onnx_metadata(
        student_input_spec(student),
        teacher.embed_dim,
        teacher.identity,
        teacher.fingerprint(),
        f"{__version__}-reference",
        "efficientnet_b3+mlp",
    )
    fp32 = export_onnx(student, tmp / "student.fp32.onnx", meta, dense=True)  # as the reference was
    from retrofit_agent.train.cli import main

    out = tmp / "bundle"
    code = main(
        [
            "bundle",
            "--model",
            str(SEEDED / "student.int8.onnx"),
            "--fp32",
            str(fp32),
            "--bank",
            str(SEEDED / "bank.npz"),
            "--prompts",
            str(REPO / "models/prompts/automotive.toml"),
            "--name",
            "variants",
            "--version",
            "1",
            "--untrained",
            "--variants",
            "int8,fp32",
            "--held-out-clip",
            str(REPO / "models/sample/drive.mp4"),
            "--held-out-count",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_the_manifest_records_each_variants_agreement_and_size(variant_bundle: Path):
    from retrofit_agent.contract.bundle import load_bundle

    m = load_bundle(variant_bundle).manifest
    assert [v.name for v in m.variants] == ["int8", "fp32"] and m.model.file == "student.int8.onnx"
    int8 = m.variants[0]
    assert int8.agreement.mean_cosine >= 0.98 and int8.agreement.top1_agreement >= 0.95
    assert int8.bytes == (variant_bundle / int8.file).stat().st_size <= 15 * 2**20
    assert m.model_variants()["fp32"].quantization.mode == "none"


def _bare_ms(path: Path, runs: int = 12) -> float:
    from retrofit_agent.contract.embedder import open_session

    s = open_session(path, 0)
    x = np.zeros((1, 3, 300, 300), np.float32)
    s.run(None, {"image": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, {"image": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def test_start_up_picks_the_faster_variant_within_the_tuning_budget(variant_bundle: Path):
    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.daemon.config import ModelConfig
    from retrofit_agent.daemon.variants import Tuner

    bare = {n: _bare_ms(variant_bundle / f"student.{n}.onnx") for n in ("int8", "fp32")}
    faster, slower = sorted(bare, key=bare.get)
    if bare[slower] < 1.15 * bare[faster]:
        pytest.skip(f"the two variants are within 15 % of each other on this CPU: {bare}")
    m = load_bundle(variant_bundle).manifest
    choice = Tuner(m, variant_bundle, ModelConfig(bundle=variant_bundle, intra_op_threads=1, spinning="off")).choose()
    assert choice.candidate.variant == faster, (choice.describe(), bare)
    assert {t.candidate.variant for t in choice.trials} == {"int8", "fp32"}
    pinned = Tuner(m, variant_bundle, ModelConfig(bundle=variant_bundle, variant=slower)).choose()
    assert pinned.candidate.variant == slower


def test_the_daemon_reports_its_variant_in_status_and_metrics(
    variant_bundle: Path, clip: Path, start_agent, subscriber
):
    agent = start_agent("--camera", str(clip), "--loop", "--bundle", str(variant_bundle))
    sub = subscriber(agent.endpoint, ("status",))
    agent.wait_ready(60)
    assert sub.poll(10_000)
    status = json.loads(sub.recv_multipart()[1])
    tuned = next(e for e in agent.events() if e.get("event") == "model_tuned")
    assert status["variant"].startswith(tuned["variant"] + "/")
    assert tuned["seconds"] <= 3.0 + 1.5  # the budget, plus the one trial that may start just inside it
    assert f'variant="{tuned["variant"]}"' in agent.scrape()
    agent.stop()


def test_a_bundle_without_variants_has_its_model_as_the_only_variant():
    from retrofit_agent.contract.bundle import read_manifest

    m = read_manifest(SEEDED)
    assert m.variants == [] and list(m.model_variants()) == ["default"]
