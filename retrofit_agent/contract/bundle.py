"""The model bundle: the contract between the offboard toolchain and the daemon.

A bundle is a directory holding ``manifest.json`` (:class:`Manifest`), an ONNX image
encoder and a text-embedding bank (``.npz``). Loading verifies the sha256 of every file and
that model, bank and manifest describe the same embedding space before anything runs.
This module is torch-free; the toolchain writes bundles through :func:`write_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from retrofit_agent.contract.errors import BundleError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION: Final = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How a camera frame becomes the model's input tensor."""

    name: str = Field(description="ONNX input name.")
    height: int = Field(gt=0, description="Input height in pixels.")
    width: int = Field(gt=0, description="Input width in pixels.")
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="Tensor layout.")
    dtype: Literal["float32"] = Field("float32", description="Input element type.")
    color: Literal["RGB", "BGR"] = Field("RGB", description="Channel order the model expects.")
    mean: tuple[float, float, float] = Field(description="Per-channel mean, on [0, 1] pixel values.")
    std: tuple[float, float, float] = Field(description="Per-channel std, on [0, 1] pixel values.")
    resize: Literal["stretch", "center_crop", "letterbox"] = Field(
        "stretch", description="How the frame's aspect ratio is handled."
    )
    interpolation: Literal["area", "linear", "cubic"] = Field("area", description="Resampling filter for the resize.")

    @model_validator(mode="after")
    def _positive_std(self) -> InputSpec:
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class OutputSpec(_Strict):
    name: str = Field(description="ONNX output name of the L2-normalised image embedding.")
    embedding_dim: int = Field(gt=0, description="Embedding dimension (the teacher's).")


class DenseOutputSpec(_Strict):
    """The optional second output: one embedding per cell of the backbone's last feature map.

    The projection head is applied to every cell (a 1x1 convolution with the pooled head's
    weights), so each cell lands in the same teacher space as the pooled embedding and can be
    scored against the same bank. Cell (i, j) covers rows ``i/H'..(i+1)/H'`` and columns
    ``j/W'..(j+1)/W'`` of the model's input image.
    """

    name: str = Field("cell_embeddings", description="ONNX output name, shape (N, H', W', D).")
    grid: tuple[int, int] = Field(description="(H', W'): the feature map's rows and columns.")

    @model_validator(mode="after")
    def _positive_grid(self) -> DenseOutputSpec:
        if min(self.grid) < 1:
            raise ValueError(f"grid must be positive, got {list(self.grid)}")
        return self


class Quantization(_Strict):
    mode: Literal["none", "int8_static_qdq"] = Field(description="Weight/activation precision.")
    per_channel: bool = Field(False, description="Per-channel weight scales.")
    calibration: str | None = Field(None, description="Calibration method and data description.")
    excluded_nodes: list[str] = Field(default_factory=list, description="Nodes kept in float.")


class ModelSpec(_Strict):
    file: str = Field(description="ONNX file, relative to the bundle.")
    architecture: str = Field(description="Student architecture, e.g. 'efficientnet_b3+mlp'.")
    input: InputSpec
    output: OutputSpec
    quantization: Quantization
    dense: DenseOutputSpec | None = Field(
        None, description="Per-cell embeddings for regions; absent: the model gives the pooled embedding only."
    )


class Agreement(_Strict):
    """How closely a variant follows the fp32 model, measured by the quality gate at bundle time."""

    mean_cosine: float = Field(ge=-1, le=1, description="Mean cosine between its and fp32's embeddings.")
    min_cosine: float = Field(ge=-1, le=1, description="Worst image's cosine.")
    top1_agreement: float = Field(ge=0, le=1, description="Zero-shot top-1 agreement with fp32, per group.")
    images: int = Field(ge=1, description="Held-out images compared.")


class VariantSpec(_Strict):
    """One more encoder for the same embedding space: same input, output and bank, another precision."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="Variant name, e.g. 'int8', 'fp32'.")
    file: str = Field(description="ONNX file, relative to the bundle.")
    quantization: Quantization
    agreement: Agreement = Field(description="Agreement with the fp32 model (1.0 for fp32 itself).")
    bytes: int = Field(ge=0, description="Size of the ONNX file.")


class EmbeddingSpace(_Strict):
    """Identity of the space image and text embeddings live in (the teacher's)."""

    teacher: str = Field(description="Teacher model and weights, e.g. 'ViT-L-14/openai'.")
    fingerprint: str = Field(min_length=8, description="Hash identifying the teacher's weights.")


_NAME = r"^[A-Za-z0-9_\-]+$"  # no dots: tags are addressed as 'group.label'


class LabelSpec(_Strict):
    name: str = Field(pattern=_NAME)
    threshold: float = Field(0.5, ge=0, le=1, description="Probability at which the tag turns on.")
    negative: bool = Field(False, description="Background label: competes in softmax, never a tag.")
    prompts: list[str] = Field(default_factory=list, description="Prompt ensemble it was built from.")
    localize: bool = Field(False, description="Where it is, not only whether: regions from the per-cell embeddings.")


class GroupSpec(_Strict):
    name: str = Field(pattern=_NAME)
    labels: list[LabelSpec] = Field(min_length=1)


class BankSpec(_Strict):
    file: str = Field(description="Text-embedding bank (.npz), relative to the bundle.")
    logit_scale: float = Field(gt=0, description="Multiplies cosine similarities before softmax.")
    groups: list[GroupSpec] = Field(min_length=1)


class Manifest(_Strict):
    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    name: str = Field(description="Bundle name.")
    version: str = Field(description="Bundle version.")
    created: str = Field(description="Creation time, ISO 8601 UTC.")
    trained: bool = Field(description="False for seeded, untrained weights (labels are meaningless).")
    notice: str = Field("", description="Human-readable caveats, logged at start-up.")
    model: ModelSpec
    embedding_space: EmbeddingSpace
    bank: BankSpec
    files: dict[str, str] = Field(description="sha256 of every file, by relative path.")
    variants: list[VariantSpec] = Field(
        default_factory=list,
        description="Encoders the daemon may choose between at start-up; empty: 'model' is the only one.",
    )

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    def model_variants(self) -> dict[str, ModelSpec]:
        """Every encoder by variant name, as a full ModelSpec; a bundle without variants has one, 'default'."""
        if not self.variants:
            return {"default": self.model}
        return {
            v.name: self.model.model_copy(update={"file": v.file, "quantization": v.quantization})
            for v in self.variants
        }

    @model_validator(mode="after")
    def _unique_variants(self) -> Manifest:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if self.variants and self.model.file not in {v.file for v in self.variants}:
            raise ValueError(f"model.file {self.model.file!r} must be one of the variants' files")
        return self


@dataclass(frozen=True)
class TextBank:
    """Unit-norm prompt embeddings, one row per label, in manifest group order."""

    embeddings: np.ndarray  # (n_labels, dim) float32
    groups: tuple[str, ...]
    labels: tuple[str, ...]
    teacher: str
    fingerprint: str

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f"{g}.{l}" for g, l in zip(self.groups, self.labels))


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    bank: TextBank

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model.file


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safe_member(root: Path, rel: str) -> Path:
    """Resolve a manifest path, refusing anything that escapes the bundle directory."""
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"bundle {root}: file {rel!r} lies outside the bundle directory")
    return path


def verify_files(root: Path, manifest: Manifest) -> None:
    for needed in (manifest.model.file, manifest.bank.file, *(v.file for v in manifest.variants)):
        if needed not in manifest.files:
            raise BundleError(f"bundle {root}: manifest lists no sha256 for {needed!r}; rebuild the bundle")
    for rel, expected in manifest.files.items():
        path = _safe_member(root, rel)
        if not path.is_file():
            raise BundleError(f"bundle {root}: missing file {rel!r}")
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise BundleError(f"bundle {root}: cannot read {rel!r}: {e.strerror}") from None
        if actual != expected:
            raise BundleError(
                f"bundle {root}: sha256 mismatch for {rel!r} (file changed or corrupt); "
                "restore it or rebuild the bundle"
            )


# --------------------------------------------------------------------------- loading


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"bundle {root}: no {MANIFEST_NAME}; is this a bundle directory?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {root}: cannot read {MANIFEST_NAME}: {e}") from None
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise BundleError(f"bundle {root}: invalid {MANIFEST_NAME}: {loc}: {first['msg']}") from None


def load_bank(path: Path) -> TextBank:
    """Load a ``.npz`` bank without pickle and check its dtype, shape and values."""
    if Path(path).is_file() and not zipfile.is_zipfile(path):  # np.load would take it for a pickle
        raise BundleError(
            f"bank {path}: not a readable .npz file (not a zip archive; 'retrofit-model prompts' writes banks)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except ValueError as e:  # object arrays need pickle: refused
        raise BundleError(f"bank {path}: refused ({e}); banks hold plain arrays only") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise BundleError(f"bank {path}: not a readable .npz file ({e})") from None
    for key in ("embeddings", "groups", "labels", "teacher", "fingerprint"):
        if key not in data:
            raise BundleError(f"bank {path}: missing array {key!r}")
    emb = data["embeddings"]
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] == 0:
        raise BundleError(f"bank {path}: embeddings must be a non-empty 2-D float32 array, got {emb.dtype} {emb.shape}")
    if not np.isfinite(emb).all():
        raise BundleError(f"bank {path}: embeddings contain NaN or infinity")
    norms = np.linalg.norm(emb, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise BundleError(f"bank {path}: embeddings are not L2-normalised (norms {norms.min():.3f}..{norms.max():.3f})")
    groups, labels = data["groups"], data["labels"]
    if groups.dtype.kind != "U" or labels.dtype.kind != "U" or len(groups) != len(emb) or len(labels) != len(emb):
        raise BundleError(f"bank {path}: groups/labels must be string arrays with one entry per embedding")
    return TextBank(
        embeddings=np.ascontiguousarray(emb),
        groups=tuple(str(g) for g in groups),
        labels=tuple(str(l) for l in labels),
        teacher=str(data["teacher"]),
        fingerprint=str(data["fingerprint"]),
    )


def check_bank_matches(manifest: Manifest, bank: TextBank, where: str) -> None:
    space = manifest.embedding_space
    if bank.fingerprint != space.fingerprint:
        raise BundleError(
            f"{where}: text bank was built with teacher {bank.teacher!r} (fingerprint {bank.fingerprint}) "
            f"but the model was distilled from {space.teacher!r} (fingerprint {space.fingerprint}); "
            "rebuild the bank with the model's teacher (retrofit-model prompts)"
        )
    dim = manifest.model.output.embedding_dim
    if bank.embeddings.shape[1] != dim:
        raise BundleError(f"{where}: bank embedding dim {bank.embeddings.shape[1]} != model embedding dim {dim}")
    expected = tuple(f"{g.name}.{l.name}" for g in manifest.bank.groups for l in g.labels)
    if bank.keys != expected:
        raise BundleError(f"{where}: bank labels do not match the manifest's groups/labels; rebuild the bundle")


def load_bundle(root: Path | str, signing_public_key: Path | None = None) -> Bundle:
    """Read, hash-check and cross-check a bundle. Raises :class:`BundleError`.

    With ``signing_public_key``, the manifest's Ed25519 signature is checked before the
    manifest is even parsed.
    """
    root = Path(root)
    if signing_public_key is not None:
        from retrofit_agent.contract.signing import verify_bundle_signature

        if not root.is_dir():
            raise BundleError(f"bundle directory not found: {root}")
        verify_bundle_signature(root, Path(signing_public_key))
    manifest = read_manifest(root)
    verify_files(root, manifest)
    bank = load_bank(_safe_member(root, manifest.bank.file))
    check_bank_matches(manifest, bank, where=f"bundle {root}")
    return Bundle(root=root, manifest=manifest, bank=bank)


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` with the sha256 of the model and bank filled in."""
    listed = {manifest.model.file, manifest.bank.file, *(v.file for v in manifest.variants), *manifest.files}
    files = {rel: sha256_file(root / rel) for rel in sorted(listed)}
    final = manifest.model_copy(update={"files": files})
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(final.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


def save_bank(
    path: Path,
    embeddings: np.ndarray,
    groups: list[str],
    labels: list[str],
    teacher: str,
    fingerprint: str,
    logit_scale: float | None = None,
) -> None:
    """Write a bank; ``logit_scale`` (the teacher's) is kept for the bundle builder."""
    extra = {} if logit_scale is None else {"logit_scale": np.asarray(logit_scale, dtype=np.float32)}
    np.savez(
        path,
        embeddings=np.asarray(embeddings, dtype=np.float32),
        groups=np.asarray(groups, dtype=np.str_),
        labels=np.asarray(labels, dtype=np.str_),
        teacher=np.asarray(teacher, dtype=np.str_),
        fingerprint=np.asarray(fingerprint, dtype=np.str_),
        **extra,  # type: ignore[arg-type]  # numpy's stub takes **kwds for the allow_pickle flag
    )
