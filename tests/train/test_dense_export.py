"""The cells output in the shipped model (issue 15): ``export --dense``, parity, int8 and the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.train]
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from retrofit_agent.contract.bundle import DenseOutputSpec, Quantization, load_bank, load_bundle  # noqa: E402
from retrofit_agent.contract.embedder import Embedder  # noqa: E402
from retrofit_agent.contract.errors import BundleError  # noqa: E402
from retrofit_agent.contract.preprocess import Preprocessor  # noqa: E402
from retrofit_agent.contract.prompts import load_prompts  # noqa: E402
from retrofit_agent.contract.sample import read_clip_frames  # noqa: E402
from retrofit_agent.train.assemble import assemble_bundle  # noqa: E402
from retrofit_agent.train.bank import write_bank  # noqa: E402
from retrofit_agent.train.export import (  # noqa: E402
    DENSE_KEY,
    DENSE_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    export_onnx,
    onnx_metadata,
    parity,
    student_input_spec,
)
from retrofit_agent.train.gate import compare, onnx_cells  # noqa: E402
from retrofit_agent.train.quantize import QuantSettings, quantize_int8  # noqa: E402
from retrofit_agent.train.student import Student  # noqa: E402
from retrofit_agent.train.teacher import Teacher  # noqa: E402
from train_helpers import REPO, fresh_logging, images  # noqa: E402,F401  (fixtures)

PROMPTS = REPO / "models" / "prompts" / "automotive.toml"


@pytest.fixture(scope="module")
def dense(tmp_path_factory, clip):
    teacher = Teacher("retrofit-micro-clip", None, seed=0)
    torch.manual_seed(0)
    student = Student("test_efficientnet", embed_dim=teacher.embed_dim, hidden_dim=128, input_size=96).eval()
    d = tmp_path_factory.mktemp("dense")
    spec = student_input_spec(student)
    meta = onnx_metadata(spec, teacher.embed_dim, teacher.identity, teacher.fingerprint(), "0.0.1", "t+mlp")
    export_onnx(student, d / "fp32.onnx", meta, dense=True)
    pre = Preprocessor(spec)
    frames = read_clip_frames(clip)
    quantize_int8(d / "fp32.onnx", d / "int8.onnx", INPUT_NAME, [pre(f) for f in frames[0::2]], QuantSettings())
    write_bank(d / "bank.npz", teacher, load_prompts(PROMPTS))
    return {"student": student, "teacher": teacher, "dir": d, "spec": spec, "frames": frames, "pre": pre}


def test_a_dense_export_has_both_outputs_its_grid_in_the_metadata_and_parity_on_the_cells(dense):
    d, student = dense["dir"], dense["student"]
    m = onnx.load(str(d / "fp32.onnx"))
    assert [o.name for o in m.graph.output] == [OUTPUT_NAME, DENSE_NAME]
    meta = {p.key: p.value for p in m.metadata_props}
    assert DenseOutputSpec.model_validate_json(meta[DENSE_KEY]) == DenseOutputSpec(name=DENSE_NAME, grid=(3, 3))
    dims = [d.dim_param or d.dim_value for d in m.graph.output[1].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 3, 64]
    assert parity(student, d / "fp32.onnx", dense["frames"][:6], dense["spec"]) <= 1e-4
    # One copy of the head serves both outputs (B3's head is 2.4 M weights: a second copy would
    # push the reference int8 model past its 15 MiB budget).
    plain = export_onnx(student, d / "plain.onnx", {k: v for k, v in meta.items() if k != DENSE_KEY})
    assert (d / "fp32.onnx").stat().st_size < 1.02 * plain.stat().st_size
    # The parity figure covers the cells: a model whose cells differ from the student's fails it.
    torch.manual_seed(1)
    other = Student("test_efficientnet", embed_dim=64, hidden_dim=128, input_size=96).eval()
    other.backbone.load_state_dict(student.backbone.state_dict())
    other.head.net[0].load_state_dict(student.head.net[0].state_dict())
    other.head.net[3].weight.data[:, :4] = student.head.net[3].weight.data[:, :4]
    assert parity(other, d / "fp32.onnx", dense["frames"][:2], dense["spec"]) > 1e-2


def test_the_camera_runtime_reads_embedding_and_cells_from_one_run(dense):
    d, student, pre = dense["dir"], dense["student"], dense["pre"]
    e = Embedder.from_onnx(d / "fp32.onnx")  # what gate, parity, evaluate and bench use
    assert e.has_cells and e.spec.dense is not None and e.spec.dense.grid == (3, 3)
    x = pre.batch(dense["frames"][:3])
    emb, cells = e.embed_with_cells(x[:1])
    assert cells is not None and cells.shape == (3, 3, 64)
    np.testing.assert_allclose(e.embed_many(x)[0], emb, atol=1e-5)
    with torch.no_grad():
        ref_emb, ref_cells = student.forward_dense(torch.from_numpy(x))
    got_emb, got_cells = onnx_cells(e, x)
    np.testing.assert_allclose(got_emb, ref_emb.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_cells, ref_cells.numpy(), atol=1e-4)


def test_int8_keeps_both_outputs_and_the_gate_reports_the_cells_cosine(dense):
    d, pre = dense["dir"], dense["pre"]
    q = onnx.load(str(d / "int8.onnx"))
    assert [o.name for o in q.graph.output] == [OUTPUT_NAME, DENSE_NAME]
    assert DENSE_KEY in {p.key for p in q.metadata_props}
    report = compare(d / "fp32.onnx", d / "int8.onnx", pre.batch(dense["frames"][1::2]), load_bank(d / "bank.npz"))
    assert report.cell_cosine is not None and report.cell_cosine >= 0.95, report.line()
    assert "cells mean cosine" in report.line()


def test_the_bundle_manifest_says_the_model_has_cells_with_their_grid(dense, tmp_path):
    d = dense["dir"]
    q = Quantization(mode="int8_static_qdq", per_channel=True)
    out = assemble_bundle(
        tmp_path / "b",
        d / "int8.onnx",
        d / "bank.npz",
        load_prompts(PROMPTS),
        name="t",
        version="1",
        trained=False,
        quantization=q,
    )
    b = load_bundle(out)
    assert b.manifest.model.dense == DenseOutputSpec(name=DENSE_NAME, grid=(3, 3))
    localized = {(g.name, lab.name) for g in b.manifest.bank.groups for lab in g.labels if lab.localize}
    assert ("pedestrians", "present") in localized and ("pedestrians", "absent") not in localized
    assert Embedder.from_file(b.model_path, b.manifest.model).has_cells


def test_a_model_whose_metadata_claims_cells_it_lacks_is_refused_at_assembly(dense, tmp_path):
    d = dense["dir"]
    m = onnx.load(str(d / "fp32.onnx"))
    for p in m.metadata_props:
        if p.key == DENSE_KEY:
            p.value = json.dumps({"name": DENSE_NAME, "grid": [10, 10]})
    onnx.save(m, str(tmp_path / "liar.onnx"))
    q = Quantization(mode="none")
    with pytest.raises(BundleError, match="does not match the manifest"):
        assemble_bundle(
            tmp_path / "b",
            tmp_path / "liar.onnx",
            d / "bank.npz",
            load_prompts(PROMPTS),
            name="t",
            version="1",
            trained=False,
            quantization=q,
        )


def _student_file(path: Path, backbone: str, teacher: Teacher) -> Path:
    torch.manual_seed(0)
    s = Student(backbone, embed_dim=teacher.embed_dim, hidden_dim=32, input_size=64)
    torch.save(
        {
            "student": s.state_dict(),
            "architecture": s.describe(),
            "teacher": teacher.identity,
            "fingerprint": teacher.fingerprint(),
            "steps": 0,
        },
        path,
    )
    return path


def test_cli_export_dense_writes_the_cells_and_refuses_a_backbone_without_a_map(
    dense, tmp_path, images, capsys, fresh_logging
):
    from retrofit_agent.train.cli import main

    cnn = _student_file(tmp_path / "cnn.pt", "test_efficientnet", dense["teacher"])
    argv = ["export", "--checkpoint", str(cnn), "--images", str(images), "--out", str(tmp_path / "m.onnx"), "--dense"]
    assert main(argv) == 0
    assert "cells (2x2 grid)" in capsys.readouterr().out
    assert Embedder.from_onnx(tmp_path / "m.onnx").spec.dense == DenseOutputSpec(name=DENSE_NAME, grid=(2, 2))

    # Exported at another size than it was distilled at (64 here): same weights, the input spec
    # and the grid follow the new size, and parity is checked at it.
    argv = ["export", "--checkpoint", str(cnn), "--images", str(images), "--out", str(tmp_path / "big.onnx")]
    assert main([*argv, "--dense", "--input-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "at 128x128 (trained at 64x64)" in out and "cells (4x4 grid)" in out
    big = Embedder.from_onnx(tmp_path / "big.onnx").spec
    assert (big.input.height, big.input.width) == (128, 128) and big.dense.grid == (4, 4)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--input-size", "16"])
    assert exit_.value.code == 2
    assert "--input-size: 16 is outside 32..2048 pixels" in capsys.readouterr().err

    vit = _student_file(tmp_path / "vit.pt", "test_vit", dense["teacher"])
    argv = ["export", "--checkpoint", str(vit), "--images", str(images), "--out", str(tmp_path / "v.onnx"), "--dense"]
    assert main(argv) == 2
    *logs, line = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("retrofit-model: error: --dense: student backbone 'test_vit' gives no spatial final")
    assert all(log.startswith("{") for log in logs)  # progress lines only: one error line, no traceback
    assert not (tmp_path / "v.onnx").exists()
