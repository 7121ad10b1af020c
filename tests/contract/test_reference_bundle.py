"""The committed seeded bundle (tests/fixtures/seeded-bundle) is reproducible from the script in the repo."""

from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.train, pytest.mark.slow]


def test_rebuilt_seeded_bundle_matches_the_committed_one(tmp_path: Path, seeded_bundle: Path, clip: Path):
    pytest.importorskip("torch")
    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.contract.embedder import Embedder
    from retrofit_agent.contract.preprocess import Preprocessor
    from retrofit_agent.contract.sample import read_clip_frames
    from retrofit_agent.train.reference import REPO, build_reference

    report = build_reference(
        tmp_path / "ref", REPO / "models/prompts/automotive.toml", REPO / "tests/fixtures/generated-drive.mp4"
    )
    assert report["parity_max_abs_diff"] <= 1e-4
    assert report["int8_vs_fp32_mean_cosine"] >= 0.98
    assert report["model_bytes"] <= 15 * 2**20

    old, new = load_bundle(seeded_bundle), load_bundle(tmp_path / "ref")
    assert new.manifest.embedding_space == old.manifest.embedding_space
    assert new.manifest.bank.groups == old.manifest.bank.groups
    np.testing.assert_allclose(new.bank.embeddings, old.bank.embeddings, atol=1e-5)

    frames = read_clip_frames(clip, every=8)
    x = Preprocessor(old.manifest.model.input).batch(frames)
    a = Embedder.from_file(old.model_path, old.manifest.model).embed_batch(x)
    b = Embedder.from_file(new.model_path, new.manifest.model).embed_batch(x)
    np.testing.assert_allclose(b, a, atol=1e-3)
