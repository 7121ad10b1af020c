"""Unlabelled images for distillation: folders, ImageFolder trees and WebDataset shards.

Each sample is one decoded source image turned into the student's view (its input size,
its mean/std) and the teacher's view (its size, CLIP mean/std) by the runtime's own
:class:`~retrofit_agent.contract.preprocess.Preprocessor`, so training sees frames exactly as the
daemon prepares them and both models see the same content.

Images that cannot be read or decoded are skipped and counted; a run never stops for one.
Data order is a pure function of (seed, epoch, rank), which makes resuming exact.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from retrofit_agent.contract.bundle import InputSpec
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.images import IMAGE_SUFFIXES, is_image
from retrofit_agent.contract.preprocess import BadFrameError, Preprocessor, to_bgr8

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes live: a file, or a byte range inside a tar shard."""

    path: str
    offset: int | None = None  # tar member data offset
    size: int | None = None
    label: str | None = None  # ImageFolder class (unused by distillation; kept for evaluation)

    @property
    def key(self) -> str:
        return self.path if self.offset is None else f"{self.path}@{self.offset}"


def expand_pattern(pattern: str) -> list[str]:
    """WebDataset brace ranges (``train-{000..099}.tar``, zero-padded) and then globs."""
    m = _BRACE.search(pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo)
        return [
            p
            for i in range(int(lo), int(hi) + 1)
            for p in expand_pattern(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :])
        ]
    if any(ch in pattern for ch in "*?["):
        return sorted(glob.glob(pattern, recursive=True))
    return [pattern]


def index_sources(patterns: Sequence[str]) -> list[ImageRef]:
    """Every image under the given sources, in a stable (sorted) order."""
    refs: list[ImageRef] = []
    for pattern in patterns:
        paths = expand_pattern(pattern)
        if not paths:
            raise ConfigError(f"data source {pattern!r} matches nothing")
        for p in paths:
            refs.extend(_index_path(Path(p)))
    return refs


def _index_path(path: Path) -> list[ImageRef]:
    if path.is_dir():
        return _index_folder(path)
    if not path.exists():
        raise ConfigError(f"data source {str(path)!r} does not exist")
    if path.name.endswith(".tar"):
        return index_tar(path)
    if is_image(path):
        return [ImageRef(str(path))]
    raise ConfigError(f"data source {str(path)!r} is neither a folder, a .tar shard nor an image")


def _index_folder(root: Path) -> list[ImageRef]:
    """Recursive. Files directly under a first-level folder's tree get that folder as label
    (the ImageFolder convention); images at the root have none."""
    refs = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if is_image(Path(name)):
                refs.append(ImageRef(str(Path(dirpath) / name), label=rel[0] if rel else None))
    return refs


def index_tar(path: Path) -> list[ImageRef]:
    """One image per WebDataset sample (members sharing a key); byte ranges, not copies.

    Uses the stdlib ``tarfile`` for the headers only; samples are then read by seeking to
    their data, so a map-style dataset can shuffle across shards.
    """
    refs, seen = [], set()
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed only: seeking needs it
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if ext in IMAGE_SUFFIXES and key not in seen:
                    seen.add(key)
                    refs.append(ImageRef(str(path), member.offset_data, member.size))
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"cannot read tar shard {str(path)!r}: {e}") from None
    return refs


def _split_key(name: str) -> tuple[str, str]:
    # WebDataset: the key is everything before the first dot of the basename.
    d, base = os.path.split(name)
    stem, _, rest = base.partition(".")
    return os.path.join(d, stem), ("." + rest.rsplit(".", 1)[-1].lower()) if rest else ""


def read_bytes(ref: ImageRef) -> bytes:
    with open(ref.path, "rb") as f:
        if ref.offset is None:
            return f.read()
        f.seek(ref.offset)
        return f.read(ref.size)


def decode(ref: ImageRef) -> np.ndarray:
    """BGR uint8 image, or raise ValueError/OSError with a reason."""
    data = np.frombuffer(read_bytes(ref), dtype=np.uint8)
    if data.size == 0:
        raise ValueError("empty file")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a decodable image")
    return to_bgr8(image)


@dataclass(frozen=True)
class Skipped:
    index: int
    key: str
    reason: str


class DistillDataset(Dataset):
    """Item ``i`` → {"index", "student", "teacher"} views of one image, or :class:`Skipped`."""

    def __init__(self, refs: Sequence[ImageRef], student: InputSpec | None, teacher: InputSpec | None) -> None:
        self.refs = list(refs)
        self.student = Preprocessor(student) if student is not None else None
        self.teacher = Preprocessor(teacher) if teacher is not None else None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict | Skipped:
        ref = self.refs[i]
        try:
            image = decode(ref)
        except (OSError, ValueError, BadFrameError, cv2.error) as e:
            return Skipped(i, ref.key, str(e) or type(e).__name__)
        item: dict = {"index": i}
        if self.student is not None:
            item["student"] = torch.from_numpy(self.student(image)[0])
        if self.teacher is not None:
            item["teacher"] = torch.from_numpy(self.teacher(image)[0])
        return item


def collate(items: list[dict | Skipped]) -> dict:
    """Stack the good items; report the skipped ones so the loop can count them."""
    good = [it for it in items if not isinstance(it, Skipped)]
    batch: dict = {
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "skipped": [it for it in items if isinstance(it, Skipped)],
    }
    for view in ("student", "teacher"):
        if good and view in good[0]:
            batch[view] = torch.stack([it[view] for it in good])
    return batch


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches for one rank: a pure function of (seed, epoch, rank, start batch).

    The permutation is cut to a multiple of world_size x batch_size (every rank takes the
    same number of full batches, as DDP needs), then dealt out round-robin by rank.
    ``start`` skips batches already trained on when resuming mid-epoch.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0
    ) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.start = rank, world, start

    @staticmethod
    def batches_per_epoch(n: int, batch_size: int, world: int) -> int:
        return n // (batch_size * world)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch(self.n, self.batch_size, self.world) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        per_rank = self.batches_per_epoch(self.n, self.batch_size, self.world) * self.batch_size
        perm = torch.randperm(self.n, generator=g)[: per_rank * self.world]
        mine = perm[self.rank :: self.world].tolist()
        for b in range(self.start, per_rank // self.batch_size):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]


def split_holdout(refs: list[ImageRef], n: int, seed: int) -> tuple[list[ImageRef], list[ImageRef]]:
    """(train, held-out): ``n`` images picked by a seeded permutation, order kept stable."""
    if n == 0:
        return refs, []
    if n >= len(refs):
        raise ConfigError(f"data.holdout={n} leaves no training images (found {len(refs)})")
    g = torch.Generator().manual_seed(seed + 104729)
    held = set(torch.randperm(len(refs), generator=g)[:n].tolist())
    return [r for i, r in enumerate(refs) if i not in held], [r for i, r in enumerate(refs) if i in held]


def batched(items: Sequence, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
