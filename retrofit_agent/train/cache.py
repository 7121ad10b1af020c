"""Teacher cache: run the frozen teacher over the training set once, on K stored views.

With ``augment.teacher_view = "same"`` the teacher must see the student's view, which a
cache of clean-image embeddings cannot give. So the cache pre-samples ``cache.views``
views per image (FKD-style): it stores each view's parameters (colour and geometry,
:class:`~retrofit_agent.train.augment.ViewParams`) with the teacher's outputs on it —
the embedding (float16), with ``cache.spatial`` the patch tokens and Q/K/V of the
configured blocks (float16), and with ``loss.dense`` the per-patch embeddings
(:meth:`~retrofit_agent.train.teacher.Teacher.encode_dense`, float16, at the teacher's
grid: the student's grid is resampled to at training time). A training step replays one stored view: it re-applies the
stored parameters to the student's input, so both still see one view. With
``teacher_view = "clean"`` one clean view is stored.

A cache that cannot lie. ``key.json`` — the teacher (name, a sha256 of all its weights),
its input (resolution, normalisation), the view set, the stored blocks and the exact
image list — is written *first*, before any shard, and compared on every build and
every read. Each shard's arrays are written to temporary names and renamed, then its
marker ``shard-NNNNN.json`` (holding the key's hash) marks it done, so an interrupted
build resumes at the first missing shard under the same key, and a directory built for
another key, or without one (an older or interrupted build), is refused with one line —
or deleted and rebuilt (``cache.on_mismatch = "rebuild"``). ``complete.json`` closes a
build.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch.utils.data import DataLoader

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.train.augment import PARAMS, Augmenter, Normalisation, ViewParams
from retrofit_agent.train.config import AugmentConfig
from retrofit_agent.train.data import DistillDataset, ImageRef, batched, collate
from retrofit_agent.train.distributed import DistEnv, barrier
from retrofit_agent.train.teacher import LayerFeatures, Teacher, TeacherFeatures

log = structlog.get_logger("retrofit_agent.train")
# 3: the key says whether per-patch embeddings are stored ("dense"); a format-2 cache is refused or rebuilt.
FORMAT = 3
KEY_FILE, COMPLETE_FILE = "key.json", "complete.json"
_ARRAYS = ("emb", "params", "valid", "tokens", "q", "k", "v", "dense")
# Augmentation settings that shape what the teacher sees (masking is the student's alone).
_SHARED_AUGMENT = (
    "enabled",
    "p_color",
    "p_crop",
    "p_rotate",
    "brightness",
    "contrast",
    "saturation",
    "crop_scale",
    "max_rotation_deg",
)


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds besides the teacher and the images."""

    views: int = 1
    seed: int = 0
    teacher_view: str = "clean"
    augment: AugmentConfig = AugmentConfig()
    layers: tuple[int, ...] | None = None  # blocks whose tokens are stored (None: embeddings only)
    qkv: bool = False  # store Q/K/V of those blocks too (PCA)
    shard_size: int = 4096
    dense: bool = False  # store the per-patch embeddings (the dense loss)

    def view_key(self) -> dict[str, Any]:
        if self.teacher_view == "clean":
            return {"teacher_view": "clean", "count": 1}
        aug = self.augment.model_dump(mode="json")
        return {
            "teacher_view": "same",
            "count": self.views,
            "seed": self.seed,
            "augment": {k: aug[k] for k in _SHARED_AUGMENT},
        }


def cache_key(teacher: Teacher, refs: Sequence[ImageRef], spec: CacheSpec) -> dict[str, Any]:
    h = hashlib.sha256()
    for r in refs:
        h.update(r.key.encode() + b"\n")
    return {
        "format": FORMAT,
        "teacher": teacher.identity,
        "weights_sha256": teacher.weights_sha256(),
        "input": teacher.input_spec().model_dump(mode="json"),
        "views": spec.view_key(),
        "spatial": None
        if spec.layers is None
        else {"layers": list(spec.layers), "qkv": spec.qkv, "grid": list(teacher.grid_size)},
        "dense": {"grid": list(teacher.dense_grid), "dim": teacher.embed_dim} if spec.dense else None,
        "shard_size": spec.shard_size,
        "images": len(refs),
        "images_sha256": h.hexdigest(),
    }


def key_sha256(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _describe(key: dict[str, Any]) -> str:
    size = key.get("input", {}).get("height", "?")
    views = key.get("views", {})
    return (
        f"{key.get('teacher', '?')} (weights {str(key.get('weights_sha256', '?'))[:12]}), {size} px, "
        f"{views.get('count', '?')} {views.get('teacher_view', '?')} view(s), {key.get('images', '?')} images"
    )


def _path(root: Path, name: str, i: int) -> Path:
    return root / (f"shard-{i:05d}.json" if name == "marker" else f"{name}-{i:05d}.npy")


def _owned_files(root: Path) -> list[Path]:
    """Files a cache build writes (this format and the earlier one), nothing else."""
    patterns = [
        KEY_FILE,
        COMPLETE_FILE,
        "meta.json",
        "shard-*.json",
        *(f"{a}-*.npy" for a in _ARRAYS),
        "*.npy.tmp",
        "*.tmp",
    ]
    return sorted({p for pat in patterns for p in root.glob(pat)})


def check_cache_dir(root: Path, key: dict[str, Any], on_mismatch: str) -> bool:
    """True when ``root`` may be used for ``key`` as it is (empty, or built for it); False when it must be
    cleared first (``on_mismatch = "rebuild"``). Raises a one-line ConfigError otherwise. Read-only."""
    key_path = root / KEY_FILE
    if key_path.exists():
        try:
            old = json.loads(key_path.read_text())
        except (json.JSONDecodeError, OSError):
            old = {}
        if old == key:
            return True
        differs = [k for k in key if old.get(k) != key[k]]
        problem = f"was built for {_describe(old)}, not {_describe(key)} (differs in: {', '.join(differs) or 'format'})"
    elif _owned_files(root):
        problem = "holds teacher outputs without a key (an older or interrupted build): nothing says what built them"
    else:
        return True
    if on_mismatch == "rebuild":
        log.warning("teacher_cache_rebuild", dir=str(root), reason=problem)
        return False
    raise ConfigError(f"teacher cache {root} {problem}; delete it, set cache.dir, or set cache.on_mismatch = 'rebuild'")


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


@dataclass
class _Build:
    teacher: Teacher
    spec: CacheSpec
    key_hash: str
    batch_size: int
    workers: int
    autocast: Callable[[], ContextManager]


def build_cache(
    root: Path,
    teacher: Teacher,
    refs: Sequence[ImageRef],
    spec: CacheSpec,
    batch_size: int,
    env: DistEnv = DistEnv(),
    workers: int = 0,
    on_mismatch: str = "refuse",
    autocast: Callable[[], ContextManager] = nullcontext,
) -> dict:
    """Compute the missing shards (rank r builds shards r, r+world, ...). Returns timing.

    Collective under DDP: every rank checks the directory (so all refuse together), rank 0
    clears it when told to rebuild and writes the key, then ranks build their shards.
    """
    key = cache_key(teacher, refs, spec)
    usable = check_cache_dir(root, key, on_mismatch)
    barrier(env)
    if env.is_main:
        if not usable:
            for p in _owned_files(root):
                p.unlink()
        root.mkdir(parents=True, exist_ok=True)
        if not (root / KEY_FILE).exists():
            _write_json_atomic(root / KEY_FILE, key)  # first: every shard after it was built for this key
    barrier(env)
    job = _Build(teacher, spec, key_sha256(key), batch_size, workers, autocast)
    n_shards = (len(refs) + spec.shard_size - 1) // spec.shard_size
    names = array_names(key)
    todo = [i for i in range(env.rank, n_shards, env.world) if not _shard_done(root, i, job.key_hash, names)]
    ds = DistillDataset(refs, None, teacher.input_spec())
    images, seconds, skipped = 0, 0.0, []
    for i in todo:
        lo, hi = i * spec.shard_size, min(len(refs), (i + 1) * spec.shard_size)
        t0 = time.monotonic()
        _build_shard(root, i, ds, range(lo, hi), job, skipped)
        seconds += time.monotonic() - t0
        images += hi - lo
        log.info("teacher_cache_shard", shard=i, shards=n_shards, images=hi - lo, views=spec.views)
    barrier(env)
    if env.is_main:
        old = json.loads((root / COMPLETE_FILE).read_text()) if (root / COMPLETE_FILE).exists() else {}
        rate = images * spec.views / seconds if seconds > 0 else old.get("teacher_images_per_s")
        _write_json_atomic(
            root / COMPLETE_FILE, {"key_sha256": job.key_hash, "shards": n_shards, "teacher_images_per_s": rate}
        )
    barrier(env)
    return {"built_images": images, "seconds": seconds, "skipped": skipped}


def array_names(key: dict[str, Any]) -> list[str]:
    """The arrays each shard of a cache with this key holds."""
    spatial = key["spatial"]
    names = ["emb", "params", "valid"] + (["tokens"] + (["q", "k", "v"] if spatial["qkv"] else []) if spatial else [])
    return names + (["dense"] if key.get("dense") else [])


def _shard_done(root: Path, i: int, key_hash: str, names: Sequence[str]) -> bool:
    """Its marker holds this key's hash and all its arrays are there (a lost file means: build it again)."""
    marker = _path(root, "marker", i)
    if not marker.exists() or json.loads(marker.read_text()).get("key_sha256") != key_hash:
        return False
    return all(_path(root, a, i).exists() for a in names)


def shard_views(spec: CacheSpec, shard: int, n: int, norm: Normalisation) -> ViewParams:
    """The stored views of one shard's ``n`` images, image-major: a pure function of (seed, shard)."""
    if spec.teacher_view == "clean":
        return ViewParams.identity(n * spec.views)
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + shard)
    return Augmenter(spec.augment, norm.mean, norm.std).sample(n * spec.views, gen)


def _build_shard(root: Path, i: int, ds: DistillDataset, indices: range, job: _Build, skipped: list[str]) -> None:
    t, spec, n, kv = job.teacher, job.spec, len(indices), job.spec.views
    norm = Normalisation(t.mean, t.std)
    params = shard_views(spec, i, n, norm)
    packed = params.pack().numpy().reshape(n, kv, PARAMS)
    arrays = _open_arrays(root, i, n, job)
    arrays["params"][:] = packed
    valid = np.zeros(n, dtype=bool)
    aug = Augmenter(spec.augment, t.mean, t.std)
    loader = DataLoader(
        ds, batch_sampler=list(batched(indices, job.batch_size)), num_workers=job.workers, collate_fn=collate
    )
    for batch in loader:
        for s in batch["skipped"]:
            skipped.append(s.key)
            log.warning("image_skipped", image=s.key, reason=s.reason)
        if len(batch["index"]) == 0:
            continue
        rows = batch["index"].numpy() - indices.start
        x = batch["teacher"].to(t.device).repeat_interleave(kv, dim=0)
        view_rows = torch.from_numpy(packed[rows].reshape(-1, PARAMS))
        x = aug.apply(x, ViewParams.unpack(view_rows), norm)
        with job.autocast():
            if spec.layers is not None or spec.dense:
                out = t.forward_features(x, spec.layers or (), qkv=spec.qkv, dense=spec.dense)
            else:
                out = t.encode_image(x)
        emb = out.embedding if isinstance(out, TeacherFeatures) else out
        arrays["emb"][rows] = emb.float().cpu().numpy().reshape(len(rows), kv, -1).astype(np.float16)
        if isinstance(out, TeacherFeatures):
            for name in ("tokens", "q", "k", "v"):
                if name in arrays:
                    per_layer = [out.patch(getattr(lf, name)).float().cpu().numpy() for lf in out.layers]
                    stacked = np.stack(per_layer, axis=1)  # (b*kv, layers, ...)
                    arrays[name][rows] = stacked.reshape(len(rows), kv, *stacked.shape[1:]).astype(np.float16)
            if out.dense is not None and "dense" in arrays:
                d = out.dense.float().cpu().numpy()  # (b*kv, gh, gw, D), image-major like the views
                arrays["dense"][rows] = d.reshape(len(rows), kv, *d.shape[1:]).astype(np.float16)
        valid[rows] = True
    arrays["valid"][:] = valid
    for arr in arrays.values():
        arr.flush()
    names = list(arrays)
    arrays.clear()  # drop the maps before renaming their files
    for name in names:
        os.replace(_tmp(_path(root, name, i)), _path(root, name, i))
    _write_json_atomic(_path(root, "marker", i), {"key_sha256": job.key_hash, "images": n, "valid": int(valid.sum())})


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _open_arrays(root: Path, i: int, n: int, job: _Build) -> dict[str, np.memmap]:
    """Shard arrays as memory maps on temporary files: token maps need not fit in memory."""
    t, spec, kv = job.teacher, job.spec, job.spec.views
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        "emb": ((n, kv, t.embed_dim), np.float16),
        "params": ((n, kv, PARAMS), np.float32),
        "valid": ((n,), np.bool_),
    }
    if spec.layers is not None:
        tokens = t.grid_size[0] * t.grid_size[1]
        shapes["tokens"] = ((n, kv, len(spec.layers), tokens, t.width), np.float16)
        if spec.qkv:
            heads = t.num_heads
            for name in ("q", "k", "v"):
                shapes[name] = ((n, kv, len(spec.layers), heads, tokens, t.width // heads), np.float16)
    if spec.dense:
        shapes["dense"] = ((n, kv, *t.dense_grid, t.embed_dim), np.float16)
    out = {}
    for name, (shape, dtype) in shapes.items():
        out[name] = np.lib.format.open_memmap(
            _tmp(_path(root, name, i)), mode="w+", dtype=dtype, shape=shape
        )  # zero-filled
    return out


@dataclass(frozen=True)
class CachedTargets:
    """One batch from the cache: the stored views and the teacher's outputs on them."""

    views: ViewParams
    target: TeacherFeatures | torch.Tensor
    ok: torch.Tensor  # (B,) bool: the teacher could read the image


class TeacherCache:
    """Memory-mapped lookup of a complete cache built for ``key`` (checked here, and per shard)."""

    def __init__(self, root: Path, key: dict[str, Any], grid: tuple[int, int]) -> None:
        key_path = root / KEY_FILE
        stored = json.loads(key_path.read_text()) if key_path.exists() else None
        if stored != key:
            raise ConfigError(f"teacher cache {root} was not built for {_describe(key)}; delete it or set cache.dir")
        key_hash = key_sha256(key)
        done = json.loads((root / COMPLETE_FILE).read_text()) if (root / COMPLETE_FILE).exists() else {}
        if done.get("key_sha256") != key_hash:
            raise ConfigError(f"teacher cache {root} is incomplete (an interrupted build); run again to finish it")
        self.shard_size, self.views, self.grid = int(key["shard_size"]), int(key["views"]["count"]), grid
        self.teacher_images_per_s: float | None = done.get("teacher_images_per_s")
        names = array_names(key)
        self.arrays: list[dict[str, np.ndarray]] = []
        for i in range(int(done["shards"])):
            if not _shard_done(root, i, key_hash, names):
                raise ConfigError(
                    f"teacher cache {root}: shard {i} is missing or was not built for this key; run again to rebuild it"
                )
            self.arrays.append({a: np.load(_path(root, a, i), mmap_mode="r") for a in names})

    def lookup(self, index: torch.Tensor, view: torch.Tensor, device: torch.device) -> CachedTargets:
        """Stored view ``view[j]`` of image ``index[j]``: its parameters and the teacher's outputs (float32)."""
        idx, vw = index.cpu().tolist(), view.cpu().tolist()

        def rows(name: str) -> np.ndarray:
            return np.stack([self.arrays[i // self.shard_size][name][i % self.shard_size, v] for i, v in zip(idx, vw)])

        ok = torch.tensor([bool(self.arrays[i // self.shard_size]["valid"][i % self.shard_size]) for i in idx])
        views = ViewParams.unpack(torch.from_numpy(rows("params")))
        emb = torch.nn.functional.normalize(torch.from_numpy(rows("emb").astype(np.float32)), dim=-1).to(device)
        first = self.arrays[0] if self.arrays else {}
        if "tokens" not in first and "dense" not in first:
            return CachedTargets(views, emb, ok)
        data = {
            name: torch.from_numpy(rows(name).astype(np.float32)).to(device)  # (B, layers, ...)
            for name in ("tokens", "q", "k", "v")
            if name in first
        }
        layers = (
            tuple(LayerFeatures(**{name: d[:, j] for name, d in data.items()}) for j in range(data["tokens"].shape[1]))
            if data
            else ()
        )
        dense = None
        if "dense" in first:  # stored as float16: unit again after the round trip
            dense = torch.nn.functional.normalize(torch.from_numpy(rows("dense").astype(np.float32)), dim=-1)
            dense = dense.to(device)
        return CachedTargets(views, TeacherFeatures(embedding=emb, layers=layers, grid=self.grid, dense=dense), ok)
