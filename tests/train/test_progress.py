"""`retrofit-model export` and `bench` run for minutes on real models: each stage says so in
one log line on stderr (JSON here, as stderr is a pipe), before the work it names."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from helpers import REPO

pytestmark = [pytest.mark.train, pytest.mark.slow, pytest.mark.integration]
torch = pytest.importorskip("torch")


def _model(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "retrofit_agent.train.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _stages(stderr: str, event: str) -> list[str]:
    return [
        json.loads(line)["stage"]
        for line in stderr.splitlines()
        if line.startswith("{") and json.loads(line).get("event") == event
    ]


def test_export_logs_each_stage(tmp_path):
    from retrofit_agent.train.student import Student

    student = Student("resnet10t", embed_dim=32, hidden_dim=64, input_size=64)
    torch.save(
        {
            "student": student.state_dict(),
            "architecture": student.describe(),
            "teacher": "t/seeded",
            "fingerprint": "0" * 16,
            "trained_from_pretrained_teacher": False,
            "steps": 1,
        },
        tmp_path / "student.pt",
    )
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (64, 80, 3), np.uint8))
    r = _model(
        "export",
        "--checkpoint",
        str(tmp_path / "student.pt"),
        "--images",
        str(images),
        "--out",
        str(tmp_path / "s.onnx"),
    )
    assert _stages(r.stderr, "export_stage") == [
        "loading the student",
        "writing ONNX and running onnx.checker",
        "parity check torch vs onnxruntime",
    ]


def test_bench_logs_each_stage():
    r = _model(
        "--log-format", "json", "bench", "--teacher", "retrofit-micro-clip", "--runs", "1", "--teacher-runs", "1"
    )
    stages = _stages(r.stderr, "bench_stage")
    assert stages[0].startswith("exporting the student") and stages[1].startswith("exporting the teacher")
    assert [st.split(" (")[0] for st in stages[2:]] == [
        "timing teacher fp32",
        "timing student fp32",
        "timing student int8",
    ]
    assert "student int8" in r.stdout  # the report itself stays on stdout
