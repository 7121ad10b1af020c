"""Scoring regions against the synthetic world's boxes: ``retrofit-model evaluate --regions``.

For each localized label (``localize = true`` in the bundle's prompts) and each model (the
teacher's dense tokens, the student fp32, the student int8), over a folder written by
``retrofit-model world images`` (``captions.jsonl`` with every instance's box):

- **pointing game**: on pictures with a legible instance of the label, the cell scoring the
  label highest (within its group, as the camera scores it) has its centre inside one of the
  label's true boxes;
- **box recall at IoU ≥ 0.3**: the share of legible true boxes that a region overlaps by at
  least 0.3;
- **false regions per frame**: regions found on pictures with no instance of the label at all.

Regions are asked for as if the label's tag were on (the camera only asks on frames where it
is), so recall and false regions measure the cells, not the pooled tag. Boxes come from the
contract's :class:`~retrofit_agent.contract.regions.RegionFinder`, the camera's own code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from retrofit_agent.contract.bundle import InputSpec
from retrofit_agent.contract.regions import Box, Region, RegionFinder, cells_to_frame, normalise_cells
from retrofit_agent.train.world.records import BoxRecord, ImageRecord

IOU_HIT = 0.3
CellsFn = Callable[[list[np.ndarray]], np.ndarray]  # BGR frames → (N, H', W', D)
FinderFactory = Callable[[InputSpec], RegionFinder]


@dataclass(frozen=True)
class CellModel:
    name: str
    spec: InputSpec  # how a frame becomes its input: the way back from cells to the frame
    cells: CellsFn


@dataclass
class LabelScore:
    images_with: int = 0  # pictures with a legible instance
    pointing_hits: int = 0
    boxes: int = 0  # legible true boxes
    boxes_found: int = 0  # of those, overlapped by a region at IoU >= 0.3
    images_without: int = 0  # pictures with no instance at all
    false_regions: int = 0

    @property
    def pointing(self) -> float:
        return self.pointing_hits / self.images_with if self.images_with else float("nan")

    @property
    def recall(self) -> float:
        return self.boxes_found / self.boxes if self.boxes else float("nan")

    @property
    def false_per_frame(self) -> float:
        return self.false_regions / self.images_without if self.images_without else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {**vars(self), "pointing": self.pointing, "recall": self.recall, "false_per_frame": self.false_per_frame}


def iou(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def true_boxes(record: ImageRecord, key: str, legible_only: bool = True) -> list[BoxRecord]:
    group, _, label = key.partition(".")
    return [b for b in record.boxes if b.group == group and b.label == label and (b.legible or not legible_only)]


def peak_point(prob: np.ndarray, spec: InputSpec, frame_hw: tuple[int, int]) -> tuple[float, float]:
    """The highest-scoring cell's centre, normalised to the frame."""
    i, j = np.unravel_index(int(np.argmax(prob)), prob.shape)
    grid = (prob.shape[0], prob.shape[1])
    x0, y0, x1, y1 = cells_to_frame((int(i), int(i) + 1), (int(j), int(j) + 1), grid, spec, frame_hw)
    return (x0 + x1) / 2, (y0 + y1) / 2


def score_model(
    model: CellModel,
    records: Sequence[ImageRecord],
    frames: Sequence[np.ndarray],
    keys: Sequence[str],
    finder_for: FinderFactory,
    batch: int = 16,
) -> tuple[dict[str, LabelScore], list[list[Region]]]:
    """Scores per label, and every picture's regions (for the drawing)."""
    finder = finder_for(model.spec)
    scores = {k: LabelScore() for k in keys}
    found: list[list[Region]] = []
    for start in range(0, len(frames), batch):
        chunk = list(frames[start : start + batch])
        cells = normalise_cells(model.cells(chunk))
        for n, frame in enumerate(chunk):
            record = records[start + n]
            hw = (frame.shape[0], frame.shape[1])
            maps = finder.label_maps(cells[n], keys)
            regions = finder(cells[n], keys, hw)
            found.append(regions)
            for key, prob in zip(keys, maps):
                s = scores[key]
                truth = true_boxes(record, key)
                mine = [r.box for r in regions if r.key == key]
                if truth:
                    s.images_with += 1
                    px, py = peak_point(prob, model.spec, hw)
                    s.pointing_hits += any(
                        b.xyxy_norm[0] <= px <= b.xyxy_norm[2] and b.xyxy_norm[1] <= py <= b.xyxy_norm[3] for b in truth
                    )
                    s.boxes += len(truth)
                    s.boxes_found += sum(any(iou(b.xyxy_norm, m) >= IOU_HIT for m in mine) for b in truth)
                elif not true_boxes(record, key, legible_only=False):
                    s.images_without += 1
                    s.false_regions += len(mine)
    return scores, found


def regions_table(results: dict[str, dict[str, LabelScore]], teacher: str | None = "teacher") -> str:
    """Rows: label × metric; columns: models. A '<' marks an int8 pointing score under 0.9 x the teacher's."""
    models = list(results)
    keys = list(next(iter(results.values())))
    head = f"{'label':30}{'metric':>12}" + "".join(f"{m:>14}" for m in models)
    lines = [head]
    for key in keys:
        first = results[models[0]][key]
        lines.append(
            f"{key:30}{'pictures':>12}"
            + f"{first.images_with:>14}"
            + f"{'with / ' + str(first.images_without) + ' without':>28}"
        )
        for metric, attr, fmt in (
            ("pointing", "pointing", "{:.3f}"),
            ("recall@.3", "recall", "{:.3f}"),
            ("false/frame", "false_per_frame", "{:.2f}"),
        ):
            row = f"{'':30}{metric:>12}"
            for m in models:
                v = getattr(results[m][key], attr)
                mark = ""
                if metric == "pointing" and teacher in results and m.endswith("int8"):
                    mark = " <" if v < 0.9 * getattr(results[teacher][key], attr) else "  "
                row += f"{fmt.format(v) + mark:>14}"
            lines.append(row)
    return "\n".join(lines)


def draw_regions(
    frames: Sequence[np.ndarray],
    records: Sequence[ImageRecord],
    found: dict[str, list[list[Region]]],
    keys: Sequence[str],
    path: Path,
    count: int = 4,
) -> Path:
    """A grid: a row per picture (with an instance of a localized label), a column per model.
    True boxes green, regions red with their label and score."""
    picks = [i for i, r in enumerate(records) if any(true_boxes(r, k) for k in keys)][:count] or [0]
    size = 256
    models = list(found)
    sheet = np.full((len(picks) * (size + 20) + 20, len(models) * (size + 10) + 10, 3), 255, np.uint8)
    for c, m in enumerate(models):
        cv2.putText(sheet, m, (10 + c * (size + 10), 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    for r, i in enumerate(picks):
        for c, m in enumerate(models):
            img = cv2.resize(frames[i], (size, size), interpolation=cv2.INTER_AREA)
            for k in keys:
                for b in true_boxes(records[i], k):
                    x0, y0, x1, y1 = (int(v * size) for v in b.xyxy_norm)
                    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 200, 0), 1)
            for reg in found[m][i]:
                x0, y0, x1, y1 = (int(v * size) for v in reg.box)
                cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 230), 2)
                cv2.putText(
                    img,
                    f"{reg.label} {reg.score:.2f}",
                    (x0 + 2, max(10, y0 + 10)),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.35,
                    (0, 0, 230),
                    1,
                )
            y, x = 20 + r * (size + 20), 10 + c * (size + 10)
            sheet[y : y + size, x : x + size] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), sheet)
    return path
