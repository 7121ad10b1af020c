"""Assemble a bundle directory from an exported model, a prompt bank and a prompts file.

Everything the manifest says about the model comes from the ONNX metadata the exporter
wrote (input spec, embedding dim, teacher identity and fingerprint, architecture), so the
manifest cannot disagree with the model it describes; the daemon's own checks run last.
A model exported with ``--dense`` carries ``retrofit.dense``: the manifest's ``model.dense``
is read from it (:func:`~retrofit_agent.contract.embedder.spec_from_metadata`) and the
Embedder checks the cells output is there with that grid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from retrofit_agent.contract.bundle import (
    BankSpec,
    DenseOutputSpec,
    EmbeddingSpace,
    InputSpec,
    Manifest,
    ModelSpec,
    OutputSpec,
    Quantization,
    VariantSpec,
    load_bundle,
    write_manifest,
)
from retrofit_agent.contract.embedder import Embedder, open_session, spec_from_metadata
from retrofit_agent.contract.errors import BundleError
from retrofit_agent.contract.messages import utc_iso
from retrofit_agent.contract.prompts import PromptSet

MODEL_FILE = "student.int8.onnx"
FLOAT_MODEL_FILE = "student.fp32.onnx"  # a bundle that ships its float model (quantization.mode "none")
BANK_FILE = "bank.npz"


def read_metadata(model_path: Path) -> dict[str, str]:
    model = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [
        k
        for k in ("retrofit.input_spec", "retrofit.embedding_dim", "retrofit.teacher", "retrofit.fingerprint")
        if k not in meta
    ]
    if missing:
        raise BundleError(f"model {model_path}: ONNX metadata lacks {missing}; export it with retrofit-model export")
    meta["output_name"] = model.graph.output[0].name
    return meta


def dense_output(model_path: Path) -> DenseOutputSpec | None:
    """The model's cells output as its metadata names it, checked against the graph (None: it has none)."""
    session = open_session(model_path)
    spec = spec_from_metadata(session, model_path)
    if spec.dense is not None:
        Embedder(session, spec, where=f"model {model_path}")  # the output exists, with that grid and width
    return spec.dense


def bank_logit_scale(bank: Path, default: float = 100.0) -> float:
    with np.load(bank, allow_pickle=False) as npz:
        return float(npz["logit_scale"]) if "logit_scale" in npz.files else default


def assemble_bundle(
    out: Path,
    model: Path,
    bank: Path,
    prompts: PromptSet,
    *,
    name: str,
    version: str,
    trained: bool | None,
    notice: str = "",
    quantization: Quantization,
    variants: list[VariantSpec] | None = None,
) -> Path:
    """With ``variants`` (already in ``out``, see train/variants.py), ``model`` is the first of them."""
    out.mkdir(parents=True, exist_ok=True)
    single = MODEL_FILE if quantization.mode == "int8_static_qdq" else FLOAT_MODEL_FILE
    model_dst, bank_dst = out / (variants[0].file if variants else single), out / BANK_FILE
    for src, dst in ((model, model_dst), (bank, bank_dst)):
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
    meta = read_metadata(model_dst)
    dense = dense_output(model_dst)
    for v in (variants or [])[1:]:  # one manifest entry for every variant: they must agree
        if dense_output(out / v.file) != dense:
            raise BundleError(
                f"variant {v.file}: its cells output differs from {model_dst.name}'s; export them from one student"
            )
    if trained is None:  # what the exporter recorded; unknown counts as untrained
        trained = meta.get("retrofit.trained") == "true"
    if not trained and not notice:
        notice = "UNTRAINED: these weights were not distilled from a pretrained teacher; labels are not meaningful."
    manifest = Manifest(
        name=name,
        version=version,
        created=utc_iso(),
        trained=trained,
        notice=notice,
        model=ModelSpec(
            file=model_dst.name,
            architecture=meta.get("retrofit.architecture", "unknown"),
            input=InputSpec.model_validate(json.loads(meta["retrofit.input_spec"])),
            output=OutputSpec(name=meta["output_name"], embedding_dim=int(meta["retrofit.embedding_dim"])),
            quantization=quantization,
            dense=dense,
        ),
        embedding_space=EmbeddingSpace(teacher=meta["retrofit.teacher"], fingerprint=meta["retrofit.fingerprint"]),
        bank=BankSpec(file=BANK_FILE, logit_scale=bank_logit_scale(bank_dst), groups=prompts.group_specs()),
        files={},
        variants=variants or [],
    )
    write_manifest(out, manifest)
    load_bundle(out)  # the daemon's own checks: hashes, bank ↔ model space and dimension
    return out
