"""The regions metrics tell a model that points at the object from one that points elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from retrofit_agent.contract.bundle import BankSpec, GroupSpec, InputSpec, LabelSpec, TextBank
from retrofit_agent.contract.regions import RegionFinder
from retrofit_agent.train.regions_eval import CellModel, iou, regions_table, score_model
from retrofit_agent.train.world.records import BoxRecord, ImageRecord

GRID = 8
KEY = "pedestrians.present"


def bank() -> tuple[TextBank, BankSpec]:
    emb = np.eye(2, dtype=np.float32)
    tb = TextBank(
        embeddings=emb, groups=("pedestrians",) * 2, labels=("present", "absent"), teacher="t", fingerprint="f" * 8
    )
    spec = BankSpec(
        file="bank.npz",
        logit_scale=20.0,
        groups=[
            GroupSpec(
                name="pedestrians",
                labels=[LabelSpec(name="present", localize=True), LabelSpec(name="absent", negative=True)],
            )
        ],
    )
    return tb, spec


def record(box: tuple[float, float, float, float] | None) -> ImageRecord:
    boxes = []
    if box is not None:
        px = tuple(int(v * 64) for v in box)
        boxes = [
            BoxRecord(
                kind="pedestrian",
                group="pedestrians",
                label="present",
                xyxy=px,
                xyxy_norm=box,
                depth_m=10.0,
                legible=True,
            )
        ]
    return ImageRecord(
        file="x.jpg",
        key="x",
        caption="",
        labels={"pedestrians": "present" if box else "absent"},
        boxes=boxes,
        seed=0,
        width=64,
        height=64,
    )


def frame_with(box: tuple[float, float, float, float] | None) -> np.ndarray:
    """A picture whose white block is the pedestrian (the fake models below read it)."""
    f = np.zeros((64, 64, 3), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = (int(v * 64) for v in box)
        f[y0:y1, x0:x1] = 255
    return f


def model(shift: int = 0) -> CellModel:
    """Cells say 'present' where the picture is white (shifted by ``shift`` cells: a wrong model)."""
    spec = InputSpec(name="image", height=GRID, width=GRID, mean=(0, 0, 0), std=(1, 1, 1))

    def cells(frames: list[np.ndarray]) -> np.ndarray:
        out = []
        for f in frames:
            white = np.roll(f[:, :, 0].reshape(GRID, 8, GRID, 8).mean(axis=(1, 3)) > 127, shift, axis=(0, 1))
            c = np.zeros((GRID, GRID, 2), np.float32)
            c[..., 0], c[..., 1] = white, ~white
            out.append(c)
        return np.stack(out)

    return CellModel(f"shift{shift}", spec, cells)


def finder_for(spec: InputSpec) -> RegionFinder:
    tb, bs = bank()
    return RegionFinder(tb, bs, spec, threshold=0.5, labels=[KEY])


BOXES = [(0.25, 0.25, 0.5, 0.625), (0.5, 0.0, 0.75, 0.25), (0.0, 0.75, 0.25, 1.0), None, None]


def test_iou():
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 1, 1), (1, 1, 2, 2)) == 0.0
    assert iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)


def test_a_model_pointing_at_the_objects_scores_full_marks_and_a_shifted_one_does_not():
    records = [record(b) for b in BOXES]
    frames = [frame_with(b) for b in BOXES]
    right, found = score_model(model(0), records, frames, [KEY], finder_for)
    s = right[KEY]
    assert (s.images_with, s.boxes, s.images_without) == (3, 3, 2)
    assert s.pointing == 1.0 and s.recall == 1.0 and s.false_per_frame == 0.0
    assert [r.box for r in found[0]] == [pytest.approx((0.25, 0.25, 0.5, 0.625))]
    wrong, _ = score_model(model(3), records, frames, [KEY], finder_for)
    w = wrong[KEY]
    assert w.pointing == 0.0 and w.recall == 0.0
    table = regions_table({"teacher": right, "student_int8": wrong})
    assert "pointing" in table and " <" in table  # int8 under 0.9 x the teacher is marked


def test_regions_on_pictures_without_the_object_are_false_regions():
    records = [record(None)] * 2
    frames = [frame_with((0.0, 0.0, 0.5, 0.5))] * 2  # white, but nobody there
    scores, _ = score_model(model(0), records, frames, [KEY], finder_for)
    assert scores[KEY].images_without == 2 and scores[KEY].false_per_frame == 1.0
