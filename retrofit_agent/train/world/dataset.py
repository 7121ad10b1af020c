"""Labelled, captioned picture sets: JPEG files, ``captions.jsonl`` and WebDataset shards.

    out/images/world-00000000.jpg ...   the pictures (JPEG quality varies per picture)
    out/captions.jsonl                  one :class:`~.records.ImageRecord` per picture
    out/shards/world-000000.tar ...     uncompressed WebDataset shards: per sample
                                        KEY.jpg, KEY.txt (caption), KEY.json (the record)

The shards are what ``retrofit-model distill`` reads (``data.train =
["out/shards/world-{000000..000009}.tar"]``): one image member per key, uncompressed so the
loader can seek to it. Tar headers carry no time or owner, so the same seed writes the same
bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from retrofit_agent.train.world.annotate import annotate
from retrofit_agent.train.world.captions import caption
from retrofit_agent.train.world.labels import LabelSpace
from retrofit_agent.train.world.records import ImageRecord
from retrofit_agent.train.world.render import encode_jpeg, render
from retrofit_agent.train.world.sample import sample_scene

SEED_STRIDE = 10_000_000  # picture i of run seed s has scene seed s * SEED_STRIDE + i
MAX_COUNT = SEED_STRIDE


def scene_seed(seed: int, index: int) -> int:
    return seed * SEED_STRIDE + index


@dataclass
class ImageSetSummary:
    count: int
    out: Path
    shards: list[Path]
    label_counts: dict[str, Counter] = field(default_factory=dict)

    @property
    def shard_pattern(self) -> str:
        """The brace pattern that names every shard (what ``data.train`` takes)."""
        if not self.shards:
            return ""
        return str(self.out / "shards" / f"world-{{000000..{len(self.shards) - 1:06d}}}.tar")


class _ShardWriter:
    def __init__(self, folder: Path, per_shard: int) -> None:
        self.folder, self.per_shard = folder, per_shard
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None or self._in_shard >= self.per_shard:
            self.close()
            path = self.folder / f"world-{len(self.paths):06d}.tar"
            self.paths.append(path)
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
            self._in_shard = 0
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def write_image_set(
    out: Path,
    count: int,
    seed: int,
    size: tuple[int, int],
    space: LabelSpace,
    per_shard: int = 1000,
    loose_files: bool = True,
) -> ImageSetSummary:
    """Render ``count`` pictures of ``size`` (width, height) into ``out`` (see module doc)."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if loose_files:
        (out / "images").mkdir(parents=True, exist_ok=True)
    width, height = size
    shards = _ShardWriter(out / "shards", per_shard)
    tally: dict[str, Counter] = {g: Counter() for g in space.groups}
    try:
        with open(out / "captions.jsonl", "w", encoding="utf-8") as jsonl:
            for i in range(count):
                s = scene_seed(seed, i)
                scene = sample_scene(s, width, height, space)
                truth = annotate(scene, space)
                jpeg = encode_jpeg(render(scene), scene.sensor.jpeg_quality)
                key = f"world-{i:08d}"
                record = ImageRecord(
                    file=f"images/{key}.jpg",
                    key=key,
                    caption=caption(scene, truth.labels, truth.boxes, space),
                    labels=truth.labels,
                    null_reasons=truth.null_reasons,
                    boxes=list(truth.boxes),
                    seed=s,
                    width=width,
                    height=height,
                )
                line = record.model_dump_json()
                jsonl.write(line + "\n")
                if loose_files:
                    (out / record.file).write_bytes(jpeg)
                shards.add(key, {"jpg": jpeg, "txt": record.caption.encode(), "json": line.encode()})
                for group, label in truth.labels.items():
                    tally[group][label] += 1
    finally:
        shards.close()
    return ImageSetSummary(count=count, out=out, shards=shards.paths, label_counts=tally)


def label_frequencies(counts: dict[str, Counter], total: int) -> dict[str, dict[str, float]]:
    """Share of pictures per label (``None`` counted as ``"null"``), for printing."""
    return {
        g: {
            str(k) if k is not None else "null": round(v / max(1, total), 4)
            for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))
        }
        for g, c in counts.items()
    }


def summary_json(summary: ImageSetSummary) -> str:
    return json.dumps(
        {
            "count": summary.count,
            "out": str(summary.out),
            "shards": summary.shard_pattern,
            "label_frequencies": label_frequencies(summary.label_counts, summary.count),
        }
    )
