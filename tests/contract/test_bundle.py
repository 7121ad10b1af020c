import json
from pathlib import Path

import numpy as np
import pytest

from retrofit_agent.contract.bundle import load_bank, load_bundle, read_manifest, save_bank, sha256_file, write_manifest
from retrofit_agent.contract.errors import BundleError


def test_seeded_bundle_loads_and_says_it_is_untrained(seeded_bundle: Path):
    b = load_bundle(seeded_bundle)
    m = b.manifest
    assert m.trained is False
    assert "UNTRAINED" in m.notice and "not meaningful" in m.notice
    assert (m.model.input.height, m.model.input.width) == (300, 300)
    assert m.model.architecture.startswith("efficientnet_b3")
    assert m.model.quantization.mode == "int8_static_qdq"
    assert b.bank.embeddings.shape == (len(b.bank.labels), m.model.output.embedding_dim)
    assert {"weather", "time_of_day", "road_type", "vehicles"} <= {g.name for g in m.bank.groups}


def test_missing_bundle_directory(tmp_path: Path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")


def test_tampered_model_is_refused(bundle_copy: Path):
    with open(bundle_copy / "student.int8.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="sha256 mismatch for 'student.int8.onnx'"):
        load_bundle(bundle_copy)


def test_tampered_bank_is_refused(bundle_copy: Path):
    (bundle_copy / "bank.npz").write_bytes((bundle_copy / "bank.npz").read_bytes() + b"x")
    with pytest.raises(BundleError, match="sha256 mismatch for 'bank.npz'"):
        load_bundle(bundle_copy)


def test_manifest_with_missing_field(bundle_copy: Path):
    data = json.loads((bundle_copy / "manifest.json").read_text())
    del data["embedding_space"]
    (bundle_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="embedding_space: Field required"):
        load_bundle(bundle_copy)


def test_manifest_path_escape_is_refused(bundle_copy: Path):
    data = json.loads((bundle_copy / "manifest.json").read_text())
    data["files"]["../../etc/passwd"] = "0" * 64
    (bundle_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle_copy)


def _rewrite_bank(bundle: Path, **overrides) -> None:
    bank = load_bank(bundle / "bank.npz")
    args = dict(
        embeddings=bank.embeddings,
        groups=list(bank.groups),
        labels=list(bank.labels),
        teacher=bank.teacher,
        fingerprint=bank.fingerprint,
    )
    args.update(overrides)
    save_bank(bundle / "bank.npz", **args)
    write_manifest(bundle, read_manifest(bundle))  # re-hash: the bank is "validly" signed off


def test_bank_from_another_teacher_is_refused(bundle_copy: Path):
    _rewrite_bank(bundle_copy, teacher="ViT-L-14/openai", fingerprint="deadbeefdeadbeef")
    with pytest.raises(BundleError, match="rebuild the bank with the model's teacher"):
        load_bundle(bundle_copy)


def test_bank_with_wrong_dimension_is_refused(bundle_copy: Path):
    bank = load_bank(bundle_copy / "bank.npz")
    emb = bank.embeddings[:, :512] / np.linalg.norm(bank.embeddings[:, :512], axis=1, keepdims=True)
    _rewrite_bank(bundle_copy, embeddings=emb)
    with pytest.raises(BundleError, match="bank embedding dim 512 != model embedding dim 768"):
        load_bundle(bundle_copy)


def test_bank_with_pickled_objects_is_refused(tmp_path: Path):
    path = tmp_path / "bank.npz"
    np.savez(
        path,
        embeddings=np.array([{"a": 1}], dtype=object),
        groups=np.array(["g"]),
        labels=np.array(["l"]),
        teacher=np.array("t"),
        fingerprint=np.array("f" * 16),
    )
    with pytest.raises(BundleError, match="refused"):
        load_bank(path)


@pytest.mark.parametrize(
    "emb, match",
    [
        (np.full((2, 4), np.nan, dtype=np.float32), "NaN"),
        (np.ones((2, 4), dtype=np.float64) / 2, "float32"),
        (np.ones((2, 4), dtype=np.float32), "not L2-normalised"),
    ],
)
def test_bank_with_bad_values_is_refused(tmp_path: Path, emb, match):
    path = tmp_path / "bank.npz"
    save_bank(path, emb, ["g", "g"], ["a", "b"], "t", "f" * 16)
    if emb.dtype == np.float64:  # save_bank casts; write the wrong dtype directly
        np.savez(
            path,
            embeddings=emb,
            groups=np.array(["g", "g"]),
            labels=np.array(["a", "b"]),
            teacher=np.array("t"),
            fingerprint=np.array("f" * 16),
        )
    with pytest.raises(BundleError, match=match):
        load_bank(path)


def test_truncated_bank_is_refused(tmp_path: Path, seeded_bundle: Path):
    path = tmp_path / "bank.npz"
    path.write_bytes((seeded_bundle / "bank.npz").read_bytes()[:500])
    with pytest.raises(BundleError, match="not a readable .npz"):
        load_bank(path)


def test_manifest_hashes_are_current(seeded_bundle: Path):
    m = read_manifest(seeded_bundle)
    for rel, digest in m.files.items():
        assert sha256_file(seeded_bundle / rel) == digest
