"""World scenes rendered on the fly, as the teacher will see pictures in distillation.

Batch ``b`` of a run is a pure function of (world seed, b): sample ``i = b * batch + j`` is
scene ``world_seed * 1e7 + i``, rendered square at a side drawn from the scene's seed,
JPEG-coded at the scene's own quality (what ``world images`` writes and distillation
reads), decoded, and resized and normalised by the runtime's
:class:`~retrofit_agent.contract.preprocess.Preprocessor` with the teacher's own
:func:`~retrofit_agent.train.teacher.teacher_view` (stretch, area filter, CLIP mean/std). So a resumed run sees exactly
the batches the uninterrupted run would have, and the teacher learns on the pixels it is
later asked about.

With ``data.cycle_scenes = N`` the run cycles over its first N scenes (a fixed training
set) instead of drawing a new scene for every sample.

Hard negatives ("twins"): optionally the last ``twins * batch`` scenes of a batch copy the
labels of an earlier scene of the batch but change one group's label, so only that group
tells the pair apart. With ``data.twin_scene = "same"`` the pair is one scene drawn twice
(:func:`minimal_pair`): the first ``twins * batch`` slots hold the first pictures, the last
as many their twins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from retrofit_agent.contract.bundle import InputSpec
from retrofit_agent.contract.preprocess import Preprocessor
from retrofit_agent.train.teacher_train.config import DataConfig, EvalConfig
from retrofit_agent.train.world import (
    LabelSpace,
    WorldError,
    annotate,
    caption,
    encode_jpeg,
    render,
    sample_conditions,
    sample_scene,
    scene_seed,
)

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class Picture:
    """One rendered scene: the decoded JPEG (BGR uint8), its caption and its ground truth."""

    seed: int
    image: np.ndarray
    caption: str
    labels: dict[str, str | None]


def picture(
    seed: int, side: int, space: LabelSpace, fixed: Mapping[str, str] | None = None, mention: tuple[str, ...] = ()
) -> Picture:
    scene = sample_scene(seed, side, side, space, fixed)
    truth = annotate(scene, space)
    jpeg = encode_jpeg(render(scene), scene.sensor.jpeg_quality)
    image = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
    return Picture(seed, image, caption(scene, truth.labels, truth.boxes, space, mention), truth.labels)


def _twin_labels(
    base: Mapping[str, str | None], space: LabelSpace, rng: np.random.Generator, groups: tuple[str, ...] = ()
) -> tuple[dict[str, str], str]:
    """``base``'s known labels with one group (of ``groups``, if given) changed to another of its labels."""
    fixed = {g: l for g, l in base.items() if l is not None}
    choices = sorted(g for g in fixed if g in space.groups and (not groups or g in groups))
    if not choices:
        raise WorldError("no group to change")
    group = str(rng.choice(choices))
    fixed[group] = str(rng.choice([l for l in space.groups[group] if l != fixed[group]]))
    return fixed, group


def minimal_pair(seed: int, side: int, space: LabelSpace, groups: tuple[str, ...] = ()) -> tuple[Picture, Picture]:
    """Two pictures of scene ``seed`` that differ in one group's label, both captions naming it.

    Every label is pinned for both, so the sampler spends no random draws on labels and the
    road, camera, light, sensor and palette come out the same; only the placement of things
    from the changed group on differs. Raises WorldError when the change cannot be drawn."""
    rng = np.random.default_rng([seed, 23])
    labels = sample_conditions(np.random.default_rng(seed), space, {})
    changed, group = _twin_labels(labels, space, rng, groups)
    return picture(seed, side, space, labels, (group,)), picture(seed, side, space, changed, (group,))


class WorldBatches(IterableDataset):
    """Yields ``{"step", "images", "tokens", "labels", "render_cpu_s"}`` for steps ``start .. stop - 1``.

    With several DataLoader workers, worker ``k`` renders steps ``k, k + n, ...`` and the
    loader's round-robin hands them out in step order.
    """

    def __init__(
        self,
        data: DataConfig,
        space: LabelSpace,
        spec: InputSpec,
        tokenizer: Tokenizer,
        batch_size: int,
        steps: tuple[int, int],
    ) -> None:
        super().__init__()
        self.data, self.space, self.spec, self.tokenizer = data, space, spec, tokenizer
        self.batch_size = batch_size
        self.start, self.stop = steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:  # a worker renders; the training process owns the other threads
            torch.set_num_threads(1)
            cv2.setNumThreads(1)
        pre = Preprocessor(self.spec)
        for step in range(self.start + k, self.stop, n):
            yield self.batch(step, pre)

    def batch(self, step: int, pre: Preprocessor | None = None) -> dict[str, Any]:
        pre = pre or Preprocessor(self.spec)
        cpu0 = time.process_time()
        b = self.batch_size
        n_twins = int(self.data.twins * b)
        pictures: list[Picture] = []
        twins: dict[int, Picture] = {}  # twin_scene = "same": slot -> the pair's second picture
        for j in range(b):
            index = step * b + j
            seed = scene_seed(self.data.world_seed, index % self.data.cycle_scenes if self.data.cycle_scenes else index)
            rng = np.random.default_rng([seed, 17])
            lo, hi = self.data.render_size
            side = int(rng.integers(lo, hi + 1))
            if j in twins:  # the second picture of a pair drawn at slot j - (b - n_twins)
                pictures.append(twins.pop(j))
                continue
            if self.data.twin_scene == "same" and j < n_twins:
                try:
                    first, second = minimal_pair(seed, side, self.space, self.data.twin_groups)
                    pictures.append(first)
                    twins[j + b - n_twins] = second
                    continue
                except WorldError:
                    pass  # a scene that cannot be changed so: this slot and its twin's get ordinary scenes
            fixed = None
            if self.data.twin_scene == "other" and j >= b - n_twins:
                for _ in range(8):  # a changed label can conflict (a parking lot in a tunnel): draw again
                    try:
                        fixed, _group = _twin_labels(pictures[j - (b - n_twins)].labels, self.space, rng)
                        pictures.append(picture(seed, side, self.space, fixed))
                        break
                    except WorldError:
                        fixed = None
            if fixed is None:
                pictures.append(picture(seed, side, self.space))
        images = torch.from_numpy(np.concatenate([pre(p.image) for p in pictures]))
        tokens = self.tokenizer([p.caption for p in pictures])
        return {
            "step": step,
            "images": images,
            "tokens": tokens,
            "labels": [p.labels for p in pictures],
            "render_cpu_s": time.process_time() - cpu0,
        }


@dataclass
class HeldOut:
    """Held-out scenes: model inputs (N, 3, H, W) and ground truth per group."""

    images: torch.Tensor
    labels: list[dict[str, str | None]]
    seeds: list[int]


def held_out(ev: EvalConfig, space: LabelSpace, spec: InputSpec, count: int) -> HeldOut:
    """The first ``count`` scenes of world seed ``ev.world_seed``, at ``ev.render_size``."""
    pre = Preprocessor(spec)
    images, labels, seeds = [], [], []
    for i in range(count):
        p = picture(scene_seed(ev.world_seed, i), ev.render_size, space)
        images.append(pre(p.image))
        labels.append(p.labels)
        seeds.append(p.seed)
    return HeldOut(torch.from_numpy(np.concatenate(images)), labels, seeds)
