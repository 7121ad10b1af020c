"""Regions: where a tag is, from the model's per-cell embeddings (torch-free).

A model with a dense output gives one unit embedding per cell of its last feature map, in the
same space as the pooled embedding. Each cell is scored against the bank exactly as a frame is
(cosine × logit scale, softmax within the label's group), so a cell's score says "this label
rather than its rivals, here". Cells at or above a threshold are joined into 8-connected
components; each component's bounding box, mapped back through the resize the frame went
through, is a region: ``(x0, y0, x1, y1)`` normalised to the original frame, in [0, 1].

The daemon and ``retrofit-model evaluate --regions`` both use :class:`RegionFinder`, so the
regions measured offboard are the regions the camera publishes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from retrofit_agent.contract.bundle import BankSpec, InputSpec, TextBank
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.preprocess import placement
from retrofit_agent.contract.zeroshot import group_softmax, zero_shot_logits

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    group: str
    label: str
    score: float  # the best cell's probability within the group
    box: Box  # x0, y0, x1, y1, normalised to the frame

    @property
    def key(self) -> str:
        return f"{self.group}.{self.label}"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def cells_to_frame(
    rows: tuple[int, int], cols: tuple[int, int], grid: tuple[int, int], spec: InputSpec, frame_hw: tuple[int, int]
) -> Box:
    """Cells ``rows[0]..rows[1]-1`` x ``cols[0]..cols[1]-1`` → a box normalised to the frame.

    Cell (i, j) covers input pixels ``i*H/H'..(i+1)*H/H'`` (likewise for columns); the input
    pixel is taken back through :func:`~retrofit_agent.contract.preprocess.placement`. Parts
    that fall on letterbox padding or outside a centre crop are clipped to the frame.
    """
    gh, gw = grid
    h, w = spec.height, spec.width
    rh, rw, oy, ox = placement(spec, *frame_hw)
    y0, y1 = rows[0] * h / gh, rows[1] * h / gh
    x0, x1 = cols[0] * w / gw, cols[1] * w / gw

    def clip(v: float) -> float:
        return float(min(1.0, max(0.0, v)))

    return (clip((x0 - ox) / rw), clip((y0 - oy) / rh), clip((x1 - ox) / rw), clip((y1 - oy) / rh))


def boxes_from_map(
    prob: np.ndarray, threshold: float, spec: InputSpec, frame_hw: tuple[int, int], max_boxes: int
) -> list[tuple[float, Box]]:
    """One label's (H', W') probability map → up to ``max_boxes`` (score, box), best first."""
    mask = (prob >= threshold).astype(np.uint8)
    if not mask.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found: list[tuple[float, Box]] = []
    grid = (prob.shape[0], prob.shape[1])
    for k in range(1, n):  # 0 is the background
        x, y, bw, bh = (int(v) for v in stats[k, :4])
        score = float(prob[labels == k].max())
        box = cells_to_frame((y, y + bh), (x, x + bw), grid, spec, frame_hw)
        if box[2] > box[0] and box[3] > box[1]:  # all of it on padding: nothing of the frame
            x0, y0, x1, y1 = (round(v, 4) for v in box)
            found.append((round(score, 4), (x0, y0, x1, y1)))
    found.sort(key=lambda sb: -sb[0])
    return found[:max_boxes]


class RegionFinder:
    """Regions for the active tags of localized labels, from one frame's cell embeddings."""

    def __init__(
        self,
        bank: TextBank,
        spec: BankSpec,
        input_spec: InputSpec,
        threshold: float = 0.5,
        max_labels: int = 4,
        max_boxes: int = 8,
        labels: Sequence[str] | None = None,
    ) -> None:
        """``labels`` ('group.label') overrides the bundle's ``localize`` marks."""
        self._emb = bank.embeddings
        self._scale = float(spec.logit_scale)
        self._input = input_spec
        self.threshold = threshold
        self.max_labels = max_labels
        self.max_boxes = max_boxes
        keys = list(bank.keys)
        rows: dict[str, list[int]] = {}
        for i, g in enumerate(bank.groups):
            rows.setdefault(g, []).append(i)
        self._group_rows = {g: np.asarray(r, dtype=np.int64) for g, r in rows.items()}
        negative = {f"{g.name}.{lab.name}" for g in spec.groups for lab in g.labels if lab.negative}
        if labels is None:
            chosen = [f"{g.name}.{lab.name}" for g in spec.groups for lab in g.labels if lab.localize]
        else:
            chosen = list(labels)
            for key in chosen:
                group, _, _ = key.partition(".")
                if group not in self._group_rows:
                    raise ConfigError(
                        f"config error: regions.labels: {key!r} names group {group!r}, which the bundle does not "
                        f"have (groups: {', '.join(self._group_rows)})"
                    )
                if key not in keys:
                    raise ConfigError(f"config error: regions.labels: unknown label {key!r} (known: group.label)")
                if key in negative:
                    raise ConfigError(f"config error: regions.labels: {key!r} is a negative label, never a tag")
        self.localized: tuple[str, ...] = tuple(chosen)
        self._row = {k: keys.index(k) for k in self.localized}

    def label_map(self, cells: np.ndarray, key: str) -> np.ndarray:
        """(H', W', D) unit cell embeddings → (H', W') probability of ``key`` within its group."""
        return np.asarray(self.label_maps(cells, [key])[0])

    def label_maps(self, cells: np.ndarray, keys: Sequence[str]) -> np.ndarray:
        """(H', W', D) → (len(keys), H', W'): each cell scored against the key's group only."""
        gh, gw, _ = cells.shape
        out = np.empty((len(keys), gh, gw), dtype=np.float32)
        flat = cells.reshape(gh * gw, -1)
        for n, key in enumerate(keys):
            group = key.partition(".")[0]
            rows = self._group_rows[group]
            logits = zero_shot_logits(flat, self._emb[rows], self._scale)
            probs = group_softmax(logits, [np.arange(len(rows))])
            out[n] = probs[:, int(np.flatnonzero(rows == self._row[key])[0])].reshape(gh, gw)
        return out

    def __call__(self, cells: np.ndarray, active: Iterable[str], frame_hw: tuple[int, int]) -> list[Region]:
        """Regions for the first ``max_labels`` of ``active`` (tag keys, best first) that are localized."""
        keys = [k for k in active if k in self._row][: self.max_labels]
        if not keys:
            return []
        cells = normalise_cells(cells)
        regions: list[Region] = []
        for key, prob in zip(keys, self.label_maps(cells, keys)):
            group, _, label = key.partition(".")
            for score, box in boxes_from_map(prob, self.threshold, self._input, frame_hw, self.max_boxes):
                regions.append(Region(group=group, label=label, score=score, box=box))
        return regions


def normalise_cells(cells: np.ndarray) -> np.ndarray:
    """Unit-normalise each cell (int8 models drift off the unit sphere)."""
    c = np.asarray(cells, dtype=np.float32)
    n = np.linalg.norm(c, axis=-1, keepdims=True)
    return c / np.where(n > 0, n, 1.0)
