"""Export parity, int8 quantization, node exclusion and the quality gate on a tiny student."""

import numpy as np
import pytest

pytestmark = [pytest.mark.train]
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from retrofit_agent.contract.bundle import TextBank  # noqa: E402
from retrofit_agent.contract.embedder import Embedder  # noqa: E402
from retrofit_agent.contract.preprocess import Preprocessor  # noqa: E402
from retrofit_agent.contract.sample import read_clip_frames  # noqa: E402
from retrofit_agent.train.export import INPUT_NAME, export_onnx, onnx_metadata, parity, student_input_spec  # noqa: E402
from retrofit_agent.train.gate import QualityGateError, compare, enforce  # noqa: E402
from retrofit_agent.train.quantize import QuantSettings, nodes_matching, quantize_int8, to_ort_format  # noqa: E402
from retrofit_agent.train.student import Student  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, clip):
    torch.manual_seed(0)
    student = Student("test_efficientnet", embed_dim=64, hidden_dim=128, input_size=96).eval()
    d = tmp_path_factory.mktemp("tiny")
    spec = student_input_spec(student)
    meta = onnx_metadata(spec, 64, "test", "f" * 16, "0.0.1", "test_efficientnet+mlp")
    export_onnx(student, d / "fp32.onnx", meta)
    frames = read_clip_frames(clip)
    pre = Preprocessor(spec)
    rng = np.random.default_rng(0)
    bank_emb = rng.normal(size=(12, 64)).astype(np.float32)
    bank_emb /= np.linalg.norm(bank_emb, axis=1, keepdims=True)
    bank = TextBank(bank_emb, tuple("abc"[i // 4] for i in range(12)), tuple(f"l{i}" for i in range(12)), "t", "f" * 16)
    return {"student": student, "dir": d, "spec": spec, "frames": frames, "pre": pre, "bank": bank}


def test_export_parity_and_metadata(tiny):
    diff = parity(tiny["student"], tiny["dir"] / "fp32.onnx", tiny["frames"][:6], tiny["spec"])
    assert diff <= 1e-4
    m = onnx.load(str(tiny["dir"] / "fp32.onnx"))
    assert m.opset_import[0].version >= 17
    keys = {p.key for p in m.metadata_props}
    assert {"retrofit.teacher", "retrofit.input_spec", "retrofit.embedding_dim"} <= keys
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_int8_passes_the_gate_and_exclusion_is_applied(tiny):
    d, pre = tiny["dir"], tiny["pre"]
    calib = [pre(f) for f in tiny["frames"][0::2]]
    held = pre.batch(tiny["frames"][1::2])
    settings = QuantSettings(exclude=("first_conv", "head"))
    quantize_int8(d / "fp32.onnx", d / "int8.onnx", INPUT_NAME, calib, settings)
    excluded = nodes_matching(d / "fp32.onnx", settings.exclude)
    assert any("conv_stem" in n for n in excluded) and any(n.startswith("/head/") for n in excluded)
    q = onnx.load(str(d / "int8.onnx"))
    quantized_inputs = {i for n in q.graph.node if n.op_type == "DequantizeLinear" for i in n.output}
    stem = [n for n in q.graph.node if n.op_type == "Conv" and "conv_stem" in n.name]
    assert stem and not any(i in quantized_inputs for i in stem[0].input[1:2]), "the stem's weights stay float"
    report = compare(d / "fp32.onnx", d / "int8.onnx", held, tiny["bank"])
    assert report.passed, report.line()
    enforce(report, 0.98, 0.95, force=False)
    assert to_ort_format(d / "int8.onnx").stat().st_size > 0


@pytest.mark.parametrize("dense", [False, True], ids=["plain", "dense"])
def test_every_exclusion_preset_names_nodes_of_both_exports(tiny, tmp_path, dense):
    """The dense export traces the backbone's parts under other node names than the plain one; a
    preset that matches nothing keeps nothing in float and says nothing."""
    path = export_onnx(tiny["student"], tmp_path / "m.onnx", {}, dense=dense)
    stem = nodes_matching(path, ("first_conv",))
    head = nodes_matching(path, ("head",))
    assert any(n.endswith("/conv_stem/Conv") for n in stem), stem
    assert any(n.endswith("/conv_head/Conv") for n in head) and any(n.startswith("/head/") for n in head), head
    assert nodes_matching(path, ("se",))
    assert not any("/blocks/" in n for n in stem + head)


def test_an_exclusion_that_names_no_node_is_refused(tiny, tmp_path):
    from retrofit_agent.contract.errors import ConfigError

    calib = [tiny["pre"](f) for f in tiny["frames"][:2]]
    settings = QuantSettings(exclude=("head", "^/no_such_block/"))
    with pytest.raises(ConfigError, match=r"--exclude: \^/no_such_block/ matches no node of fp32.onnx"):
        quantize_int8(tiny["dir"] / "fp32.onnx", tmp_path / "q.onnx", INPUT_NAME, calib, settings)
    assert not (tmp_path / "q.onnx").exists()


def test_torch_fp32_onnx_and_int8_agree_on_the_same_frames(tiny):
    """Three-way parity: the student in torch, its fp32 ONNX and its int8 QDQ, each run the way
    its user runs it (torch eval; the camera's Embedder for both ONNX files)."""
    d, pre = tiny["dir"], tiny["pre"]
    if not (d / "int8.onnx").exists():
        quantize_int8(
            d / "fp32.onnx", d / "int8.onnx", INPUT_NAME, [pre(f) for f in tiny["frames"][0::2]], QuantSettings()
        )
    x = pre.batch(tiny["frames"][1::2])
    with torch.no_grad():
        ref = tiny["student"].eval()(torch.from_numpy(x)).numpy()
    fp32 = Embedder.from_onnx(d / "fp32.onnx").embed_many(x)
    int8 = Embedder.from_onnx(d / "int8.onnx").embed_many(x)
    assert Embedder.from_onnx(d / "int8.onnx").spec.quantization.mode == "int8_static_qdq"
    assert np.abs(ref - fp32).max() <= 1e-4
    cos = (fp32 * int8).sum(axis=1)
    print(
        f"torch↔fp32 max |diff| {np.abs(ref - fp32).max():.2e}; fp32↔int8 cosine mean {cos.mean():.4f} min {cos.min():.4f}"
    )
    assert cos.min() >= 0.95


def test_gate_refuses_a_broken_quantization(tiny):
    d, pre = tiny["dir"], tiny["pre"]
    held = pre.batch(tiny["frames"][1::2])
    quantize_int8(d / "fp32.onnx", d / "good.onnx", INPUT_NAME, [pre(f) for f in tiny["frames"][0::2]], QuantSettings())
    m = onnx.load(str(d / "good.onnx"))
    # Corrupt the weight scales (what a broken calibration or a bit flip in a bundle does):
    # every weight DequantizeLinear gets per-channel scales off by random factors of 0.1-10.
    inits = {i.name: i for i in m.graph.initializer}
    rng = np.random.default_rng(0)
    for node in m.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[1] in inits:
            init = inits[node.input[1]]
            scale = onnx.numpy_helper.to_array(init)
            scale = (scale * 10.0 ** rng.uniform(-1, 1, size=scale.shape)).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(scale, init.name))
    onnx.save(m, str(d / "broken.onnx"))
    report = compare(d / "fp32.onnx", d / "broken.onnx", held, tiny["bank"])
    assert not report.passed, report.line()
    with pytest.raises(QualityGateError, match="quality gate refused the int8 model: .*--force"):
        enforce(report, 0.98, 0.95, force=False)
    enforce(report, 0.98, 0.95, force=True)  # forced: written anyway


@pytest.mark.parametrize("method", ["minmax", "minmax-mean"])
def test_minmax_takes_the_extremes_and_minmax_mean_each_pictures_own_range(tiny, tmp_path, method):
    """The input's quantization range over two calibration pictures, one spanning [-1, 1] and one
    [-3, 5]: minmax takes [-3, 5] (stretched by the one wide picture), minmax-mean the mean of
    the two, [-2, 3]. (Read off the scale and zero point onnxruntime wrote for the input.)"""
    h, w = tiny["spec"].height, tiny["spec"].width
    narrow = np.linspace(-1, 1, 3 * h * w, dtype=np.float32).reshape(1, 3, h, w)
    wide = np.linspace(-3, 5, 3 * h * w, dtype=np.float32).reshape(1, 3, h, w)
    out = tmp_path / "int8.onnx"
    quantize_int8(tiny["dir"] / "fp32.onnx", out, INPUT_NAME, [narrow, wide], QuantSettings(method=method))
    graph = onnx.load(str(out)).graph
    (q,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == INPUT_NAME]
    init = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    scale, zero = float(init[q.input[1]]), int(init[q.input[2]])
    lo, hi = (-3.0, 5.0) if method == "minmax" else (-2.0, 3.0)
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-3)
    assert zero == round(-lo / scale)
