from pathlib import Path

import numpy as np
import pytest

from retrofit_agent.contract.bundle import load_bundle
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.errors import BundleError
from retrofit_agent.contract.preprocess import Preprocessor
from retrofit_agent.contract.sample import render_frame


def test_reference_model_gives_unit_embeddings(seeded_bundle: Path):
    b = load_bundle(seeded_bundle)
    emb = Embedder.from_file(b.model_path, b.manifest.model, intra_op_threads=1)
    emb.warmup(1)
    x = Preprocessor(b.manifest.model.input)(render_frame(3))
    e = emb.embed(x)
    assert e.shape == (b.manifest.model.output.embedding_dim,)
    assert abs(float(np.linalg.norm(e)) - 1.0) < 1e-5
    batch = emb.embed_batch(np.concatenate([x, x]))
    assert batch.shape == (2, e.shape[0])


def test_manifest_input_size_must_match_the_model(seeded_bundle: Path):
    b = load_bundle(seeded_bundle)
    wrong = b.manifest.model.model_copy(update={"input": b.manifest.model.input.model_copy(update={"height": 224})})
    with pytest.raises(BundleError, match=r"shape .* does not match the manifest's \['N', 3, 224, 300\]"):
        Embedder.from_file(b.model_path, wrong)


def test_manifest_output_name_must_exist(seeded_bundle: Path):
    b = load_bundle(seeded_bundle)
    wrong = b.manifest.model.model_copy(update={"output": b.manifest.model.output.model_copy(update={"name": "feats"})})
    with pytest.raises(BundleError, match="manifest names output 'feats' but the model has"):
        Embedder.from_file(b.model_path, wrong)


def test_non_onnx_file_is_a_bundle_error(tmp_path: Path, seeded_bundle: Path):
    b = load_bundle(seeded_bundle)
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(BundleError, match="onnxruntime cannot load it"):
        Embedder.from_file(bad, b.manifest.model)


def test_the_reference_model_gives_cells_on_its_manifest_grid(seeded_bundle: Path):
    b = load_bundle(seeded_bundle)
    dense = b.manifest.model.dense
    assert dense is not None and dense.grid == (10, 10)
    emb = Embedder.from_file(b.model_path, b.manifest.model, intra_op_threads=1)
    x = Preprocessor(b.manifest.model.input)(render_frame(3))
    e, cells = emb.embed_with_cells(x)
    assert cells is not None and cells.shape == (10, 10, b.manifest.model.output.embedding_dim)
    np.testing.assert_allclose(e, emb.embed(x), atol=1e-6)  # the pooled embedding is unchanged


def test_a_manifest_grid_the_model_does_not_have_is_one_line(seeded_bundle: Path):
    b = load_bundle(seeded_bundle)
    spec = b.manifest.model
    assert spec.dense is not None
    wrong = spec.model_copy(update={"dense": spec.dense.model_copy(update={"grid": (5, 5)})})
    with pytest.raises(
        BundleError, match=r"output 'cell_embeddings'.*does not match the manifest's \['N', 5, 5, "
    ) as e:
        Embedder.from_file(b.model_path, wrong)
    assert "\n" not in str(e.value)


def test_a_manifest_claiming_cells_the_model_lacks_is_one_line(seeded_bundle: Path, tmp_path: Path):
    """The same model with its cells output cut off, under the manifest that still claims it."""
    onnx = pytest.importorskip("onnx")
    b = load_bundle(seeded_bundle)
    model = onnx.load(str(b.model_path))
    keep = [o for o in model.graph.output if o.name != "cell_embeddings"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    cut = tmp_path / "pooled-only.onnx"
    onnx.save(model, str(cut))
    with pytest.raises(
        BundleError, match=r"manifest names dense output 'cell_embeddings' but the model has \['embedding'\]"
    ) as e:
        Embedder.from_file(cut, b.manifest.model)
    assert "\n" not in str(e.value)
    Embedder.from_file(cut, b.manifest.model.model_copy(update={"dense": None}))  # without the claim it loads
