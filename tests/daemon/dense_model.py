"""For the regions tests: a tiny real ONNX model with per-cell output, its bundle, and clips for it.

The model is built with ``onnx.helper`` so that the test decides what its cells say: a cell's
brightness points it at ``pedestrians.present`` (bright) or ``pedestrians.none`` (dark), and
``scene.road`` is always the scene. Input 40x40, 4x4 average pooling: a 10x10 grid of cells,
each a 1x1 convolution of its mean colour, unit-normalised; the pooled embedding is the
cells' maximum, so a frame is tagged ``pedestrians.present`` exactly when some cell is bright.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from retrofit_agent.contract.bundle import (
    BankSpec,
    DenseOutputSpec,
    EmbeddingSpace,
    GroupSpec,
    InputSpec,
    LabelSpec,
    Manifest,
    ModelSpec,
    OutputSpec,
    Quantization,
    save_bank,
    write_manifest,
)

SIDE = 40  # model input, pixels
GRID = 10  # cells per side
DIM = 8
TEACHER, FINGERPRINT = "dense-test/seeded", "0123456789abcdef"
# Bank rows, one basis vector each: pedestrians.{present, none}, scene.{road, sky}.
KEYS = ("pedestrians.present", "pedestrians.none", "scene.road", "scene.sky")


def dense_onnx(path: Path, cells: bool = True) -> Path:
    """Input (N,3,40,40) → "embedding" (N,8) and, with ``cells``, "cell_embeddings" (N,10,10,8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # Normalised brightness v (about -2 black .. +2 white) → v on row 0 (present), a constant
    # 0.5 on row 1 (none) and 1.0 on row 2 (road): bright cells point at present, dark ones and
    # letterbox padding (v ~ 0) at none, and every cell at road rather than sky.
    w = np.zeros((DIM, 3, 1, 1), dtype=np.float32)
    w[0, :, 0, 0] = 1.0 / 3.0
    b = np.zeros(DIM, dtype=np.float32)
    b[1], b[2] = 0.5, 1.0
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["pooled", "w", "b"], ["grid"]),
        helper.make_node("GlobalMaxPool", ["grid"], ["gmax"]),
        helper.make_node("Flatten", ["gmax"], ["flat"], axis=1),
        helper.make_node("ReduceL2", ["flat"], ["flat_norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["flat", "flat_norm"], ["embedding"]),
    ]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM])]
    if cells:
        nodes += [
            helper.make_node("Transpose", ["grid"], ["nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("ReduceL2", ["nhwc"], ["cell_norm"], axes=[3], keepdims=1),
            helper.make_node("Div", ["nhwc", "cell_norm"], ["cell_embeddings"]),
        ]
        outputs.append(helper.make_tensor_value_info("cell_embeddings", TensorProto.FLOAT, ["N", GRID, GRID, DIM]))
    graph = helper.make_graph(
        nodes,
        "dense_test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        outputs,
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def dense_bundle(
    root: Path,
    cells: bool = True,
    resize: str = "letterbox",
    localize: tuple[str, ...] = ("pedestrians.present",),
    variants: bool = False,
) -> Path:
    """A verified bundle around :func:`dense_onnx`; ``variants``: an fp32 and an 'int8' copy of it."""
    root.mkdir(parents=True, exist_ok=True)
    dense_onnx(root / "model.onnx", cells=cells)
    save_bank(root / "bank.npz", np.eye(len(KEYS), DIM), [k.split(".")[0] for k in KEYS],
              [k.split(".")[1] for k in KEYS], TEACHER, FINGERPRINT)  # fmt: skip
    groups: dict[str, list[LabelSpec]] = {}
    for key in KEYS:
        g, label = key.split(".")
        groups.setdefault(g, []).append(LabelSpec(name=label, threshold=0.6, localize=key in localize))
    model = ModelSpec(
        file="model.onnx",
        architecture="dense-test",
        input=InputSpec(name="image", height=SIDE, width=SIDE, mean=(0.5,) * 3, std=(0.25,) * 3, resize=resize),
        output=OutputSpec(name="embedding", embedding_dim=DIM),
        quantization=Quantization(mode="none"),
        dense=DenseOutputSpec(grid=(GRID, GRID)) if cells else None,
    )
    extra = {}
    if variants:
        from retrofit_agent.contract.bundle import Agreement, VariantSpec

        (root / "model.int8.onnx").write_bytes((root / "model.onnx").read_bytes())
        agree = Agreement(mean_cosine=1.0, min_cosine=1.0, top1_agreement=1.0, images=1)
        extra["variants"] = [
            VariantSpec(name=n, file=f, quantization=Quantization(mode=q), agreement=agree, bytes=0)
            for n, f, q in (("fp32", "model.onnx", "none"), ("int8", "model.int8.onnx", "int8_static_qdq"))
        ]
    manifest = Manifest(
        name="dense-test",
        version="1",
        created="2026-11-30T00:00:00Z",
        trained=True,
        model=model,
        embedding_space=EmbeddingSpace(teacher=TEACHER, fingerprint=FINGERPRINT),
        bank=BankSpec(
            file="bank.npz", logit_scale=100.0, groups=[GroupSpec(name=g, labels=ls) for g, ls in groups.items()]
        ),
        files={},
        **extra,
    )
    write_manifest(root, manifest)
    return root


# A white patch on black, in frame fractions (x0, y0, x1, y1). The middle one maps onto whole
# cells for both clips below, so its region is exactly these fractions.
MIDDLE = (0.4, 0.3, 0.6, 0.7)
EDGE = (0.0, 0.3, 0.2, 0.7)


def patch_clip(path: Path, size: tuple[int, int], patches: list[tuple[float, float, float, float] | None]) -> Path:
    """A video file (mp4v) of ``size`` (w, h), one frame per entry: a white patch there, or none."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 15.0, size)
    assert writer.isOpened()
    try:
        for p in patches:
            img = np.zeros((h, w, 3), dtype=np.uint8)
            if p is not None:
                img[round(p[1] * h) : round(p[3] * h), round(p[0] * w) : round(p[2] * w)] = 255
            writer.write(img)
    finally:
        writer.release()
    return path
