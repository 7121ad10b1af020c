"""Regions: cells → boxes in the original frame, checked against hand-computed fixtures and
against the preprocessor's own resize; and the finder's scoring within a label's group."""

from __future__ import annotations

import numpy as np
import pytest

from retrofit_agent.contract.bundle import BankSpec, GroupSpec, InputSpec, LabelSpec, TextBank
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.preprocess import Preprocessor, placement
from retrofit_agent.contract.regions import RegionFinder, boxes_from_map, cells_to_frame


def spec(mode: str = "stretch", h: int = 300, w: int = 300) -> InputSpec:
    return InputSpec(name="image", height=h, width=w, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=mode)


# Hand-computed: input 300x300, grid 10x10, so a cell is 30 input pixels.
@pytest.mark.parametrize(
    ("mode", "frame_hw", "rows", "cols", "expected"),
    [
        # stretch: input fractions are frame fractions, whatever the frame's shape
        ("stretch", (720, 1280), (2, 4), (5, 7), (0.5, 0.2, 0.7, 0.4)),
        ("stretch", (1280, 720), (0, 10), (9, 10), (0.9, 0.0, 1.0, 1.0)),
        # letterbox 150x300 (2:1): scale 1, the frame fills rows 75..225 of the input
        ("letterbox", (150, 300), (3, 5), (0, 10), (0.0, 0.1, 1.0, 0.5)),
        ("letterbox", (150, 300), (7, 8), (2, 3), (0.2, 0.9, 0.3, 1.0)),  # y 210..240: clipped at 225
        # letterbox 600x300 (1:2): scale 0.5 → 300x150 at columns 75..225
        ("letterbox", (600, 300), (0, 10), (4, 5), (0.3, 0.0, 0.5, 1.0)),
        # centre crop 300x600: scale 1, the input shows frame columns 150..450
        ("center_crop", (300, 600), (0, 10), (0, 10), (0.25, 0.0, 0.75, 1.0)),
        ("center_crop", (300, 600), (5, 6), (1, 2), (0.3, 0.5, 0.35, 0.6)),
        # centre crop 1200x600 (tall): scale 0.5 → 600x300, rows 150..450 of it shown
        ("center_crop", (1200, 600), (0, 5), (0, 10), (0.0, 0.25, 1.0, 0.5)),
    ],
)
def test_cells_map_to_hand_computed_frame_boxes(mode, frame_hw, rows, cols, expected):
    box = cells_to_frame(rows, cols, (10, 10), spec(mode), frame_hw)
    np.testing.assert_allclose(box, expected, atol=1e-9)


def test_cells_wholly_on_letterbox_padding_give_no_box():
    prob = np.zeros((10, 10), np.float32)
    prob[0:2, 3:6] = 0.9  # input rows 0..60: padding above a 150x300 frame (which starts at row 75)
    assert boxes_from_map(prob, 0.5, spec("letterbox"), (150, 300), 8) == []
    prob[4, 4] = 0.95
    [(score, box)] = boxes_from_map(prob, 0.5, spec("letterbox"), (150, 300), 8)
    assert score == pytest.approx(0.95) and box == pytest.approx((0.4, 0.3, 0.5, 0.5))


@pytest.mark.parametrize("mode", ["stretch", "letterbox", "center_crop"])
@pytest.mark.parametrize("frame_hw", [(360, 640), (640, 360), (250, 400), (300, 300)])
def test_the_mapping_inverts_the_preprocessors_own_resize(mode, frame_hw):
    """A white block in the frame, resized by the camera's Preprocessor: its pixels in the model
    input, mapped back with cells of one input pixel, land on the block (to a pixel's rounding)."""
    fh, fw = frame_hw
    frame = np.zeros((fh, fw, 3), np.uint8)
    y0, y1, x0, x1 = int(0.40 * fh), int(0.60 * fh), int(0.45 * fw), int(0.70 * fw)
    frame[y0:y1, x0:x1] = 255
    s = spec(mode, h=96, w=128)
    image = Preprocessor(s).resize(frame)
    ys, xs = np.nonzero(image[:, :, 0] > 200)  # above the letterbox pad (mean grey)
    box = cells_to_frame((ys.min(), ys.max() + 1), (xs.min(), xs.max() + 1), (96, 128), s, frame_hw)
    rh, rw, _, _ = placement(s, fh, fw)
    tol = 3.0 / min(rh, rw)  # the resize's rounding and the area filter's edge: a pixel or two
    np.testing.assert_allclose(box, (x0 / fw, y0 / fh, x1 / fw, y1 / fh), atol=tol)


def test_components_are_8_connected_and_sorted_by_score():
    prob = np.zeros((6, 8), np.float32)
    prob[1, 1] = prob[2, 2] = 0.7  # diagonal neighbours: one component
    prob[4, 6] = prob[4, 7] = 0.9
    found = boxes_from_map(prob, 0.5, spec(h=60, w=80), (60, 80), 8)
    assert [s for s, _ in found] == [pytest.approx(0.9), pytest.approx(0.7)]
    assert found[0][1] == pytest.approx((6 / 8, 4 / 6, 1.0, 5 / 6), abs=1e-4)  # published to 4 places
    assert found[1][1] == pytest.approx((1 / 8, 1 / 6, 3 / 8, 3 / 6), abs=1e-4)
    assert len(boxes_from_map(prob, 0.5, spec(h=60, w=80), (60, 80), 1)) == 1
    assert boxes_from_map(prob, 0.95, spec(h=60, w=80), (60, 80), 8) == []


# --------------------------------------------------------------------------- the finder


def bank_and_spec() -> tuple[TextBank, BankSpec]:
    """Two groups in 4-D: pedestrians (present, absent: negative) and weather (clear, rain)."""
    emb = np.eye(4, dtype=np.float32)
    groups = ("pedestrians", "pedestrians", "weather", "weather")
    labels = ("present", "absent", "clear", "rain")
    bank = TextBank(embeddings=emb, groups=groups, labels=labels, teacher="t", fingerprint="f" * 8)
    bspec = BankSpec(
        file="bank.npz",
        logit_scale=10.0,
        groups=[
            GroupSpec(
                name="pedestrians",
                labels=[LabelSpec(name="present", localize=True), LabelSpec(name="absent", negative=True)],
            ),
            GroupSpec(name="weather", labels=[LabelSpec(name="clear"), LabelSpec(name="rain")]),
        ],
    )
    return bank, bspec


def cells_with_pedestrian(rows: slice, cols: slice) -> np.ndarray:
    """A 5x5 grid: 'absent' everywhere, 'present' in the block; weather says rain everywhere."""
    cells = np.zeros((5, 5, 4), np.float32)
    cells[..., 1] = 1.0
    cells[..., 3] = 1.0
    cells[rows, cols, 1] = 0.0
    cells[rows, cols, 0] = 1.0
    return cells * 3.0  # not unit length, like an int8 model's: the finder normalises


def test_the_finder_boxes_a_localized_label_where_its_cells_win_their_group():
    bank, bspec = bank_and_spec()
    finder = RegionFinder(bank, bspec, spec(h=100, w=100))
    assert finder.localized == ("pedestrians.present",)
    cells = cells_with_pedestrian(slice(1, 3), slice(2, 4))
    [region] = finder(cells, ["weather.rain", "pedestrians.present"], (480, 640))
    assert (region.group, region.label) == ("pedestrians", "present")
    assert region.box == pytest.approx((0.4, 0.2, 0.8, 0.6))
    # scored within its group: e^(10·1/√2)/(e^(10/√2)+e^0) for a cell (present+rain)/√2
    assert region.score == pytest.approx(1 / (1 + np.exp(-10 / np.sqrt(2))), abs=1e-4)
    assert region.centre == pytest.approx((0.6, 0.4)) and region.area == pytest.approx(0.16)


def test_the_finder_only_boxes_active_localized_tags_up_to_max_labels():
    bank, bspec = bank_and_spec()
    cells = cells_with_pedestrian(slice(0, 1), slice(0, 1))
    finder = RegionFinder(bank, bspec, spec(h=100, w=100))
    assert finder(cells, ["weather.rain"], (100, 100)) == []  # not localized
    assert finder(cells, [], (100, 100)) == []  # not an active tag
    finder = RegionFinder(bank, bspec, spec(h=100, w=100), labels=["pedestrians.present", "weather.rain"])
    both = finder(cells, ["weather.rain", "pedestrians.present"], (100, 100))
    assert [r.key for r in both] == ["weather.rain", "pedestrians.present"]
    assert both[0].box == pytest.approx((0.0, 0.0, 1.0, 1.0))  # rain in every cell: one box, the frame
    capped = RegionFinder(bank, bspec, spec(h=100, w=100), max_labels=1, labels=["pedestrians.present", "weather.rain"])
    assert [r.key for r in capped(cells, ["weather.rain", "pedestrians.present"], (100, 100))] == ["weather.rain"]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["lights.red"], "names group 'lights', which the bundle does not have"),
        (["weather.hail"], "unknown label 'weather.hail'"),
        (["pedestrians.absent"], "is a negative label"),
    ],
)
def test_bad_localize_overrides_are_one_clear_line(labels, message):
    bank, bspec = bank_and_spec()
    with pytest.raises(ConfigError, match=message) as e:
        RegionFinder(bank, bspec, spec(), labels=labels)
    assert "\n" not in str(e.value)
