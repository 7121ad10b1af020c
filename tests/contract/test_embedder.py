from pathlib import Path

import numpy as np
import pytest

from retrofit_agent.contract.bundle import load_bundle
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.errors import BundleError
from retrofit_agent.contract.preprocess import Preprocessor
from retrofit_agent.contract.sample import render_frame


def test_reference_model_gives_unit_embeddings(reference_bundle: Path):
    b = load_bundle(reference_bundle)
    emb = Embedder.from_file(b.model_path, b.manifest.model, intra_op_threads=1)
    emb.warmup(1)
    x = Preprocessor(b.manifest.model.input)(render_frame(3))
    e = emb.embed(x)
    assert e.shape == (b.manifest.model.output.embedding_dim,)
    assert abs(float(np.linalg.norm(e)) - 1.0) < 1e-5
    batch = emb.embed_batch(np.concatenate([x, x]))
    assert batch.shape == (2, e.shape[0])


def test_manifest_input_size_must_match_the_model(reference_bundle: Path):
    b = load_bundle(reference_bundle)
    wrong = b.manifest.model.model_copy(update={"input": b.manifest.model.input.model_copy(update={"height": 224})})
    with pytest.raises(BundleError, match=r"shape .* does not match the manifest's \['N', 3, 224, 300\]"):
        Embedder.from_file(b.model_path, wrong)


def test_manifest_output_name_must_exist(reference_bundle: Path):
    b = load_bundle(reference_bundle)
    wrong = b.manifest.model.model_copy(update={"output": b.manifest.model.output.model_copy(update={"name": "feats"})})
    with pytest.raises(BundleError, match="manifest names output 'feats' but the model has"):
        Embedder.from_file(b.model_path, wrong)


def test_non_onnx_file_is_a_bundle_error(tmp_path: Path, reference_bundle: Path):
    b = load_bundle(reference_bundle)
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(BundleError, match="onnxruntime cannot load it"):
        Embedder.from_file(bad, b.manifest.model)
