"""Teacher embedding cache: run the frozen teacher over the training set once.

Runs that only use the final-embedding, affinity and adversarial losses need nothing
from the teacher but its (clean-view) embedding, which never changes. The cache stores
them in shards of ``shard_size`` images (``emb-00000.npy`` float16, ``valid-00000.npy``);
each shard is written to a temporary name and renamed, so an interrupted build resumes at
the first missing shard. ``meta.json`` ties the cache to the teacher (fingerprint), its
input view and the exact image list; a mismatch is an error, never a silent reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import structlog
import torch
from torch.utils.data import DataLoader

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.train.data import DistillDataset, ImageRef, batched, collate
from retrofit_agent.train.distributed import DistEnv, barrier
from retrofit_agent.train.teacher import Teacher

log = structlog.get_logger("retrofit_agent.train")


def cache_key(teacher: Teacher, refs: Sequence[ImageRef]) -> dict:
    h = hashlib.sha256()
    for r in refs:
        h.update(r.key.encode() + b"\n")
    return {
        "teacher": teacher.identity, "fingerprint": teacher.fingerprint(),
        "input": teacher.input_spec().model_dump(mode="json"), "images": len(refs), "images_sha256": h.hexdigest(),
    }


def _shard_paths(root: Path, i: int) -> tuple[Path, Path]:
    return root / f"emb-{i:05d}.npy", root / f"valid-{i:05d}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def build_cache(root: Path, teacher: Teacher, refs: Sequence[ImageRef], shard_size: int, batch_size: int,
                env: DistEnv = DistEnv(), workers: int = 0) -> dict:
    """Compute the missing shards (rank r builds shards r, r+world, ...). Returns timing."""
    key = cache_key(teacher, refs)
    meta_path = root / "meta.json"
    root.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["key"] != key:
            raise ConfigError(f"teacher cache {root} was built for another teacher or image list; delete it or set cache.dir")
    barrier(env)
    n_shards = (len(refs) + shard_size - 1) // shard_size
    todo = [i for i in range(env.rank, n_shards, env.world) if not _shard_paths(root, i)[1].exists()]
    ds = DistillDataset(refs, None, teacher.input_spec())
    images, seconds, skipped = 0, 0.0, []
    for i in todo:
        lo, hi = i * shard_size, min(len(refs), (i + 1) * shard_size)
        t0 = time.monotonic()
        emb, valid = _embed_range(ds, teacher, range(lo, hi), batch_size, workers, skipped)
        seconds += time.monotonic() - t0
        images += hi - lo
        emb_path, valid_path = _shard_paths(root, i)
        _save_atomic(emb_path, emb)
        _save_atomic(valid_path, valid)  # written last: its presence marks the shard done
        log.info("teacher_cache_shard", shard=i, shards=n_shards, images=hi - lo)
    barrier(env)
    if env.is_main:
        rate = images / seconds if seconds > 0 else None
        old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta = {"key": key, "shard_size": shard_size, "dim": teacher.embed_dim,
                "teacher_images_per_s": rate or old.get("teacher_images_per_s")}
        meta_path.write_text(json.dumps(meta, indent=2))
    barrier(env)
    return {"built_images": images, "seconds": seconds, "skipped": skipped}


def _embed_range(ds: DistillDataset, teacher: Teacher, indices: range, batch_size: int, workers: int,
                 skipped: list[str]) -> tuple[np.ndarray, np.ndarray]:
    emb = np.zeros((len(indices), teacher.embed_dim), dtype=np.float16)
    valid = np.zeros(len(indices), dtype=bool)
    loader = DataLoader(ds, batch_sampler=list(batched(indices, batch_size)), num_workers=workers, collate_fn=collate)
    for batch in loader:
        for s in batch["skipped"]:
            skipped.append(s.key)
            log.warning("image_skipped", image=s.key, reason=s.reason)
        if len(batch["index"]) == 0:
            continue
        e = teacher.encode_image(batch["teacher"].to(teacher.device)).cpu().numpy()
        rows = batch["index"].numpy() - indices.start
        emb[rows], valid[rows] = e.astype(np.float16), True
    return emb, valid


class TeacherCache:
    """Memory-mapped lookup of cached embeddings by training-set index."""

    def __init__(self, root: Path, teacher: Teacher, refs: Sequence[ImageRef]) -> None:
        meta = json.loads((root / "meta.json").read_text())
        if meta["key"] != cache_key(teacher, refs):
            raise ConfigError(f"teacher cache {root} does not match this teacher and image list")
        self.shard_size = int(meta["shard_size"])
        self.teacher_images_per_s: float | None = meta.get("teacher_images_per_s")
        n_shards = (len(refs) + self.shard_size - 1) // self.shard_size
        self.emb = [np.load(_shard_paths(root, i)[0], mmap_mode="r") for i in range(n_shards)]
        self.valid = [np.load(_shard_paths(root, i)[1]) for i in range(n_shards)]

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings float32 re-normalised, valid mask) for a batch of indices."""
        idx = index.tolist()
        rows = np.stack([self.emb[i // self.shard_size][i % self.shard_size] for i in idx]).astype(np.float32)
        ok = torch.tensor([bool(self.valid[i // self.shard_size][i % self.shard_size]) for i in idx])
        return torch.nn.functional.normalize(torch.from_numpy(rows), dim=-1), ok
