"""The world's WebDataset shards feed ``retrofit-model distill``'s data loader unchanged."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from retrofit_agent.contract.bundle import InputSpec  # noqa: E402
from retrofit_agent.contract.preprocess import Preprocessor  # noqa: E402
from retrofit_agent.train.cli import main  # noqa: E402
from retrofit_agent.train.data import DistillDataset, collate, index_sources  # noqa: E402
from retrofit_agent.train.world.records import ImageRecord  # noqa: E402

pytestmark = [pytest.mark.train]

STUDENT = InputSpec(name="image", height=48, width=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TEACHER = InputSpec(name="teacher", height=32, width=32, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))


def test_the_distill_loader_reads_every_picture_of_the_world_shards(tmp_path: Path, capsys):
    out = tmp_path / "world"
    assert main(["world", "images", "--count", "10", "--out", str(out), "--size", "96x96", "--shard-size", "4"]) == 0
    capsys.readouterr()
    refs = index_sources([str(out / "shards" / "world-{000000..000002}.tar")])
    assert len(refs) == 10  # one image per sample: the .txt and .json members are not images
    records = [ImageRecord.model_validate_json(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    ds = DistillDataset(refs, STUDENT, TEACHER)
    batch = collate([ds[i] for i in range(len(ds))])
    assert (
        batch["skipped"] == []
        and batch["student"].shape == (10, 3, 48, 48)
        and batch["teacher"].shape == (10, 3, 32, 32)
    )
    for i, record in enumerate(records):  # shard order is captions.jsonl order, pixel for pixel
        expected = Preprocessor(STUDENT)(cv2.imread(str(out / record.file)))[0]
        np.testing.assert_array_equal(ds[i]["student"].numpy(), expected)
