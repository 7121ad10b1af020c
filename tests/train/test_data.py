"""Image sources, corrupt images, deterministic order, and the two views of one image."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from retrofit_agent.contract.bundle import InputSpec  # noqa: E402
from retrofit_agent.contract.errors import ConfigError  # noqa: E402
from retrofit_agent.contract.preprocess import Preprocessor  # noqa: E402
from retrofit_agent.train.data import (  # noqa: E402
    DistillDataset,
    EpochBatchSampler,
    Skipped,
    collate,
    expand_pattern,
    index_sources,
    split_holdout,
)
from retrofit_agent.train.synthetic import write_images  # noqa: E402

pytestmark = [pytest.mark.train]

STUDENT = InputSpec(name="image", height=40, width=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TEACHER = InputSpec(name="teacher", height=32, width=32, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))


def _shard(path: Path, images: list[Path], extra_member: bool = True) -> None:
    with tarfile.open(path, "w") as tar:
        for i, img in enumerate(images):
            tar.add(img, arcname=f"sample{i:04d}.png")
            if extra_member:  # WebDataset samples carry other members under the same key
                data = f'{{"i": {i}}}'.encode()
                info = tarfile.TarInfo(f"sample{i:04d}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_folder_is_recursive_and_imagefolder_subdirs_become_labels(tmp_path: Path):
    write_images(tmp_path / "cats", 3, seed=0)
    write_images(tmp_path / "dogs" / "nested", 2, seed=1)
    write_images(tmp_path, 1, seed=2)
    (tmp_path / "notes.txt").write_text("not an image")
    refs = index_sources([str(tmp_path)])
    assert len(refs) == 6
    assert sorted(r.label for r in refs if r.label) == ["cats"] * 3 + ["dogs"] * 2
    assert refs == index_sources([str(tmp_path)])  # stable order


def test_webdataset_shards_with_brace_patterns_read_the_same_pixels(tmp_path: Path):
    paths = write_images(tmp_path / "src", 5, seed=3)
    _shard(tmp_path / "train-000.tar", paths[:3])
    _shard(tmp_path / "train-001.tar", paths[3:])
    assert expand_pattern(str(tmp_path / "train-{000..001}.tar")) == [
        str(tmp_path / f"train-00{i}.tar") for i in (0, 1)
    ]
    refs = index_sources([str(tmp_path / "train-{000..001}.tar")])
    assert len(refs) == 5  # one image per sample; the .json members are not images
    ds = DistillDataset(refs, STUDENT, None)
    for i, p in enumerate(paths):
        expected = Preprocessor(STUDENT)(cv2.imread(str(p)))[0]
        np.testing.assert_array_equal(ds[i]["student"].numpy(), expected)


def test_missing_source_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        index_sources([str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="matches nothing"):
        index_sources([str(tmp_path / "*.tar")])


def test_corrupt_and_empty_images_are_skipped_and_counted(tmp_path: Path):
    write_images(tmp_path, 4, seed=4)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    refs = index_sources([str(tmp_path)])
    ds = DistillDataset(refs, STUDENT, TEACHER)
    batch = collate([ds[i] for i in range(len(ds))])
    assert len(batch["index"]) == 4
    assert batch["student"].shape == (4, 3, 40, 40) and batch["teacher"].shape == (4, 3, 32, 32)
    assert sorted(Path(s.key).name for s in batch["skipped"]) == ["broken.jpg", "empty.png"]
    assert all(isinstance(s, Skipped) and s.reason for s in batch["skipped"])


def test_student_and_teacher_views_come_from_the_same_source_image(tmp_path: Path):
    [path] = write_images(tmp_path, 1, seed=5)
    item = DistillDataset(index_sources([str(tmp_path)]), STUDENT, TEACHER)[0]
    image = cv2.imread(str(path))
    np.testing.assert_array_equal(item["student"].numpy(), Preprocessor(STUDENT)(image)[0])
    np.testing.assert_array_equal(item["teacher"].numpy(), Preprocessor(TEACHER)(image)[0])


def test_batch_order_is_seeded_disjoint_across_ranks_and_resumable():
    def order(**kw):
        return list(EpochBatchSampler(103, 8, **kw))

    a = order(seed=1, epoch=0)
    assert a == order(seed=1, epoch=0) and a != order(seed=1, epoch=1) and a != order(seed=2, epoch=0)
    assert len(a) == 12 and all(len(b) == 8 for b in a)  # the ragged tail is dropped
    r0, r1 = order(seed=1, epoch=0, rank=0, world=2), order(seed=1, epoch=0, rank=1, world=2)
    assert len(r0) == len(r1) == 6
    assert not set(sum(r0, [])) & set(sum(r1, []))
    assert order(seed=1, epoch=0, start=5) == a[5:]


def test_holdout_is_seeded_and_disjoint(tmp_path: Path):
    write_images(tmp_path, 20, seed=6)
    refs = index_sources([str(tmp_path)])
    train, val = split_holdout(refs, 5, seed=0)
    assert len(val) == 5 and len(train) == 15 and not set(train) & set(val)
    assert split_holdout(refs, 5, seed=0) == (train, val)
    with pytest.raises(ConfigError):
        split_holdout(refs, 20, seed=0)
