"""Bad input at start-up: one clear line and exit code 2, never a traceback (plus fuzzing)."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import run_cli
from retrofit_agent.contract.bundle import load_bank, read_manifest, save_bank, write_manifest
from retrofit_agent.contract.errors import BundleError, ConfigError
from retrofit_agent.daemon.config import load_config


def _rehash(bundle: Path) -> None:
    write_manifest(bundle, read_manifest(bundle))


def truncated_model(b: Path) -> None:
    data = (b / "student.int8.onnx").read_bytes()
    (b / "student.int8.onnx").write_bytes(data[: len(data) // 3])
    _rehash(b)


def non_onnx_model(b: Path) -> None:
    (b / "student.int8.onnx").write_bytes(b"GIF89a not a model at all")
    _rehash(b)


def pickled_bank(b: Path) -> None:
    bank = load_bank(b / "bank.npz")
    np.savez(
        b / "bank.npz",
        embeddings=np.array([object()] * 2, dtype=object),
        groups=np.array(bank.groups),
        labels=np.array(bank.labels),
        teacher=np.array(bank.teacher),
        fingerprint=np.array(bank.fingerprint),
    )
    _rehash(b)


def float64_bank(b: Path) -> None:
    bank = load_bank(b / "bank.npz")
    np.savez(
        b / "bank.npz",
        embeddings=bank.embeddings.astype(np.float64),
        groups=np.array(bank.groups),
        labels=np.array(bank.labels),
        teacher=np.array(bank.teacher),
        fingerprint=np.array(bank.fingerprint),
    )
    _rehash(b)


def nan_bank(b: Path) -> None:
    bank = load_bank(b / "bank.npz")
    emb = bank.embeddings.copy()
    emb[3, 7] = np.nan
    save_bank(b / "bank.npz", emb, list(bank.groups), list(bank.labels), bank.teacher, bank.fingerprint)
    _rehash(b)


def wrong_dim_bank(b: Path) -> None:
    bank = load_bank(b / "bank.npz")
    emb = bank.embeddings[:, :256] / np.linalg.norm(bank.embeddings[:, :256], axis=1, keepdims=True)
    save_bank(b / "bank.npz", emb, list(bank.groups), list(bank.labels), bank.teacher, bank.fingerprint)
    _rehash(b)


def manifest_missing_field(b: Path) -> None:
    data = json.loads((b / "manifest.json").read_text())
    del data["model"]["input"]["mean"]
    (b / "manifest.json").write_text(json.dumps(data))


def manifest_not_json(b: Path) -> None:
    (b / "manifest.json").write_text("{ this is not json")


def wrong_hash(b: Path) -> None:
    data = json.loads((b / "manifest.json").read_text())
    data["files"]["bank.npz"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(data))


def model_is_a_directory(b: Path) -> None:
    (b / "student.int8.onnx").unlink()
    (b / "student.int8.onnx").mkdir()


BROKEN = {
    "truncated model": (truncated_model, "onnxruntime cannot load it"),
    "non-ONNX model": (non_onnx_model, "onnxruntime cannot load it"),
    "pickled bank": (pickled_bank, "banks hold plain arrays only"),
    "float64 bank": (float64_bank, "float32"),
    "NaN bank": (nan_bank, "NaN"),
    "wrong-dimension bank": (wrong_dim_bank, "bank embedding dim 256 != model embedding dim 768"),
    "manifest missing a field": (manifest_missing_field, "model.input.mean: Field required"),
    "manifest not JSON": (manifest_not_json, "invalid manifest.json"),
    "wrong hash": (wrong_hash, "sha256 mismatch for 'bank.npz'"),
    "unreadable model path": (model_is_a_directory, "missing file 'student.int8.onnx'"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_bundle_exits_2_with_one_line(case, bundle_copy, clip, tmp_path):
    breaker, needle = BROKEN[case]
    breaker(bundle_copy)
    r = run_cli(
        "--camera", str(clip), "--bundle", str(bundle_copy), "--no-metrics", "--publish", f"ipc://{tmp_path}/x.sock"
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("retrofit-agent: error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.parametrize(
    "setup, needle",
    [
        ("config_is_directory", "cannot read config file"),
        ("out_of_range", "camera.backoff_max_s: Input should be greater than 0"),
        ("bundle_is_file", "bundle directory not found"),
    ],
)
def test_unusable_paths_and_values_exit_2(setup, needle, tmp_path, clip):
    args = ["--camera", str(clip), "--no-metrics", "--publish", f"ipc://{tmp_path}/x.sock"]
    if setup == "config_is_directory":
        args += ["--config", str(tmp_path)]
    elif setup == "out_of_range":
        cfg = tmp_path / "a.toml"
        cfg.write_text("[camera]\nbackoff_max_s = 0\n")
        args += ["--config", str(cfg)]
    else:
        f = tmp_path / "bundle.txt"
        f.write_text("x")
        args += ["--bundle", str(f)]
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- fuzzing

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=20)
)
keys = st.sampled_from(
    [
        "camera",
        "model",
        "labels",
        "publish",
        "metrics",
        "log",
        "collect",
        "max_frames",
        "source",
        "fps",
        "bundle",
        "thresholds",
        "endpoint",
        "address",
        "format",
        "campaigns",
        "store",
        "x",
    ]
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(keys, children, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, trees, max_size=5))
def test_fuzzed_config_trees_never_escape_as_tracebacks(tree):
    from pydantic import ValidationError

    from retrofit_agent.daemon.config import AgentConfig, format_validation_error

    try:
        AgentConfig.model_validate(tree)
    except ValidationError as e:
        line = format_validation_error(e)
        assert "\n" not in line and line.startswith("config error: ")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_toml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "a.toml"
    path.write_text(text)
    try:
        load_config(path, {})
    except ConfigError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "RETROFIT_CAMERA__FPS",
                "RETROFIT_MAX_FRAMES",
                "RETROFIT_LOG__FORMAT",
                "RETROFIT_LABELS__THRESHOLDS",
                "RETROFIT_CAMERA",
                "RETROFIT_X__Y__Z",
            ]
        ),
        st.text(max_size=30),
        max_size=3,
    )
)
def test_fuzzed_environment(env):
    try:
        load_config(None, env)
    except ConfigError as e:
        assert "\n" not in str(e)


MANIFEST = None


def _manifest_text(reference: Path) -> dict:
    global MANIFEST
    if MANIFEST is None:
        MANIFEST = json.loads((reference / "manifest.json").read_text())
    return MANIFEST


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_fail_cleanly(data, seeded_bundle, tmp_path):
    """Mutate one field of a real manifest at random: it loads, or fails with one BundleError line."""
    m = json.loads(json.dumps(_manifest_text(seeded_bundle)))
    node, path = m, []
    while isinstance(node, (dict, list)) and node:
        key = data.draw(st.sampled_from(list(node.keys()) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        if not isinstance(node[key], (dict, list)) or data.draw(st.booleans()):
            break
        node = node[key]
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    if path:
        parent[path[-1]] = data.draw(trees)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    try:
        read_manifest(tmp_path)
    except BundleError as e:
        assert "\n" not in str(e)
