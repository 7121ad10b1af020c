"""The whole toolchain through its CLI, ending in the daemon: synth-images → distill →
export → prompts → quantize → bundle → retrofit-agent; plus evaluate and cityscapes-index.

The teacher is a seeded micro CLIP and the run is 20 steps: the bundle is real in every
respect but training, and is marked untrained."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import REPO, receive, run_cli

pytestmark = [pytest.mark.train, pytest.mark.slow, pytest.mark.integration]
pytest.importorskip("torch")


def model_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "retrofit_agent.train.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    assert r.returncode == 0, f"retrofit-model {args[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    images = d / "images"
    model_cli("synth-images", "--out", str(images), "--count", "96")
    model_cli(
        "distill",
        "--config",
        str(REPO / "models/configs/tiny.toml"),
        "--out",
        str(d / "run"),
        "--max-steps",
        "20",
        "--no-progress",
        "--set",
        f'data.train=["{images}"]',
        "--set",
        "data.holdout=16",
    )
    export = model_cli(
        "export",
        "--checkpoint",
        str(d / "run" / "student.pt"),
        "--images",
        str(images),
        "--out",
        str(d / "student.fp32.onnx"),
        "--version",
        "0.0.1-test",
    )
    teacher = ["--teacher", "retrofit-micro-clip", "--pretrained", "none", "--seed", "0"]
    model_cli(
        "prompts", "--prompts", str(REPO / "models/prompts/automotive.toml"), *teacher, "--out", str(d / "bank.npz")
    )
    quant = model_cli(
        "quantize",
        "--fp32",
        str(d / "student.fp32.onnx"),
        "--calibration",
        str(images),
        "--count",
        "48",
        "--held-out",
        str(images),
        "--bank",
        str(d / "bank.npz"),
        "--exclude",
        "first_conv",
        "--out",
        str(d / "student.int8.onnx"),
        "--ort",
    )
    model_cli(
        "bundle",
        "--model",
        str(d / "student.int8.onnx"),
        "--bank",
        str(d / "bank.npz"),
        "--prompts",
        str(REPO / "models/prompts/automotive.toml"),
        "--name",
        "pipeline-test",
        "--version",
        "0.0.1-test",
        "--out",
        str(d / "bundle"),
    )
    return {"dir": d, "images": images, "teacher": teacher, "export": export.stdout, "quantize": quant.stdout}


def test_export_reports_parity_and_quantize_reports_the_gate(pipeline):
    line = [l for l in pipeline["export"].splitlines() if "parity" in l][0]
    assert float(line.split("max |diff| ")[1].split()[0]) <= 1e-4
    assert "mean cosine" in pipeline["quantize"] and "float: first_conv" in pipeline["quantize"]
    assert (pipeline["dir"] / "student.int8.ort").stat().st_size > 0


def test_pipeline_bundle_runs_in_the_daemon(pipeline, start_agent, subscriber, clip):
    bundle = pipeline["dir"] / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["trained"] is False and "UNTRAINED" in manifest["notice"]
    assert manifest["embedding_space"]["teacher"] == "retrofit-micro-clip/seeded-untrained"
    assert manifest["model"]["architecture"] == "test_efficientnet+mlp"
    agent = start_agent("--camera", str(clip), "--loop", "--bundle", str(bundle))
    sub = subscriber(agent.endpoint, ("tags",))
    agent.wait_ready()
    msgs = receive(sub, 2.0)
    assert agent.stop() == 0
    assert len(msgs) >= 5 and msgs[0][1]["model"] == "pipeline-test@0.0.1-test"
    assert {t["group"] for t in msgs[0][1]["top"]} >= {"weather", "vehicles"}


def test_bank_from_another_teacher_is_refused_by_the_daemon(pipeline, tmp_path, clip):
    import shutil

    from retrofit_agent.contract.bundle import read_manifest, write_manifest

    bundle = tmp_path / "bundle"
    shutil.copytree(pipeline["dir"] / "bundle", bundle)
    other = ["--teacher", "retrofit-micro-clip", "--pretrained", "none", "--seed", "1"]
    model_cli(
        "prompts", "--prompts", str(REPO / "models/prompts/automotive.toml"), *other, "--out", str(bundle / "bank.npz")
    )
    write_manifest(bundle, read_manifest(bundle))  # consistent hashes: only the embedding space differs
    r = run_cli("--camera", str(clip), "--bundle", str(bundle), "--no-metrics", "--publish", f"ipc://{tmp_path}/x.sock")
    assert r.returncode == 2 and "rebuild the bank with the model's teacher" in r.stderr


def _write_folder(root: Path) -> None:
    for name, colour in (("red_car", (0, 0, 220)), ("blue_sky", (220, 120, 0))):
        (root / name).mkdir(parents=True)
        for i in range(4):
            img = np.full((48, 64, 3), colour, np.uint8)
            img[i * 4 : i * 4 + 8] = 255 - i * 30
            cv2.imwrite(str(root / name / f"{i}.png"), img)


def test_evaluate_and_cityscapes_index_through_the_cli(pipeline, tmp_path):
    from test_evaluate import write_cityscapes

    _write_folder(tmp_path / "folder")
    write_cityscapes(tmp_path / "cityscapes")
    model_cli("cityscapes-index", "--root", str(tmp_path / "cityscapes"), "--out", str(tmp_path / "index.jsonl"))
    index = [json.loads(l) for l in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in index] == [["road", "sky", "car"], ["road", "person"]]
    d = pipeline["dir"]
    r = model_cli(
        "evaluate",
        "--bundle",
        str(d / "bundle"),
        "--fp32",
        str(d / "student.fp32.onnx"),
        *pipeline["teacher"],
        "--imagefolder",
        str(tmp_path / "folder"),
        "--multilabel",
        str(tmp_path / "index.jsonl"),
        "--out",
        str(tmp_path / "eval"),
    )
    single = json.loads((tmp_path / "eval" / "single_label.json").read_text())
    assert single["images"] == 8 and set(single["models"]) == {"teacher", "student_int8", "student_fp32"}
    assert 0 <= single["models"]["student_int8"]["top1_agreement_with_teacher"] <= 1
    multi = json.loads((tmp_path / "eval" / "multi_label.json").read_text())
    road = [c for c in multi["teacher"]["classes"] if c["name"] == "road"][0]
    assert (road["positives"], road["negatives"]) == (2, 0)  # present everywhere: AUROC undefined (NaN)
    assert "mean" in r.stdout and cv2.imread(str(tmp_path / "eval" / "auroc.png")) is not None


def test_evaluate_refuses_a_teacher_that_is_not_the_bundles(pipeline, tmp_path):
    d = pipeline["dir"]
    _write_folder(tmp_path / "folder")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "retrofit_agent.train.cli",
            "evaluate",
            "--bundle",
            str(d / "bundle"),
            "--teacher",
            "retrofit-micro-clip",
            "--pretrained",
            "none",
            "--seed",
            "5",
            "--imagefolder",
            str(tmp_path / "folder"),
            "--out",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2 and "is not the teacher of" in r.stderr and "Traceback" not in r.stderr
