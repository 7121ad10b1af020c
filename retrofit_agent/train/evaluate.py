"""Evaluation: zero-shot accuracy (single-label) and per-class AUROC (multi-label).

Single-label: an ImageFolder (one folder per class); zero-shot top-1/top-5 of the
teacher, the student fp32 and the student int8, their agreement, and the students' mean
embedding cosine to the teacher.

Multi-label: the paper's protocol on Cityscapes/Mapillary Vistas, where every class present
in an image's segmentation annotation is an image-level label; per-class one-vs-rest
ROC-AUC from the raw cosine between image and class-prompt embeddings, their mean, and the
positive/negative counts. :func:`cityscapes_index` converts the gtFine layout.

The metric functions are plain numpy; only scoring images with the teacher needs torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from retrofit_agent.contract.images import find_images

# Cityscapes label ids → names, for the 19 classes used in evaluation (ignoreInEval False),
# from cityscapesScripts' labels.py.
CITYSCAPES_EVAL = {
    7: "road",
    8: "sidewalk",
    11: "building",
    12: "wall",
    13: "fence",
    17: "pole",
    19: "traffic light",
    20: "traffic sign",
    21: "vegetation",
    22: "terrain",
    23: "sky",
    24: "person",
    25: "rider",
    26: "car",
    27: "truck",
    28: "bus",
    31: "train",
    32: "motorcycle",
    33: "bicycle",
}


# --------------------------------------------------------------------------- metrics


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """One-vs-rest ROC-AUC (Mann–Whitney U with average ranks for ties); NaN if one class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def topk_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


@dataclass(frozen=True)
class ClassAuroc:
    name: str
    auroc: float
    positives: int
    negatives: int


def per_class_auroc(scores: np.ndarray, labels: np.ndarray, names: list[str]) -> list[ClassAuroc]:
    """scores, labels: (images, classes)."""
    return [
        ClassAuroc(n, auroc(scores[:, c], labels[:, c]), int(labels[:, c].sum()), int((~labels[:, c]).sum()))
        for c, n in enumerate(names)
    ]


def mean_auroc(rows: list[ClassAuroc]) -> float:
    vals = [r.auroc for r in rows if not np.isnan(r.auroc)]
    return float(np.mean(vals)) if vals else float("nan")


# --------------------------------------------------------------------------- data sets


def cityscapes_index(root: Path, split: str = "val", min_pixels: int = 1) -> list[dict]:
    """gtFine ``*_labelIds.png`` → [{"image": leftImg8bit path, "labels": [class names]}].

    A class is present when at least ``min_pixels`` pixels carry its label id.
    """
    out = []
    for label_path in sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png")):
        ids = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        if ids is None:
            raise ValueError(f"cannot read {label_path}")
        values, counts = np.unique(ids, return_counts=True)
        present = [
            CITYSCAPES_EVAL[int(v)] for v, c in zip(values, counts) if int(v) in CITYSCAPES_EVAL and c >= min_pixels
        ]
        stem = label_path.name[: -len("_gtFine_labelIds.png")]
        image = root / "leftImg8bit" / split / label_path.parent.name / f"{stem}_leftImg8bit.png"
        out.append({"image": str(image), "labels": sorted(present, key=list(CITYSCAPES_EVAL.values()).index)})
    return out


def write_index(index: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in index))


def read_index(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def image_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, targets = [], []
    for c, name in enumerate(classes):
        for p in find_images(root / name):
            paths.append(p)
            targets.append(c)
    return paths, np.asarray(targets), classes


# --------------------------------------------------------------------------- reports


def auroc_table(results: dict[str, list[ClassAuroc]]) -> str:
    models = list(results)
    first = results[models[0]]
    lines = [f"{'class':<16}{'pos':>6}{'neg':>6}" + "".join(f"{m:>14}" for m in models)]
    for i, row in enumerate(first):
        lines.append(
            f"{row.name:<16}{row.positives:>6}{row.negatives:>6}"
            + "".join(f"{results[m][i].auroc:>14.3f}" for m in models)
        )
    lines.append(f"{'mean':<28}" + "".join(f"{mean_auroc(results[m]):>14.3f}" for m in models))
    return "\n".join(lines)


def auroc_chart(results: dict[str, list[ClassAuroc]], path: Path) -> Path:
    """Grouped bars of per-class AUROC per model."""
    return bar_chart({m: {r.name: r.auroc for r in rows} for m, rows in results.items()}, path)


def bar_chart(values: dict[str, dict[str, float]], path: Path, goal: float | None = None) -> Path:
    """Grouped bars on [0, 1]: a group of bars per name, a bar per model (drawn with OpenCV:
    no plotting dependency); ``goal`` draws a dashed red line."""
    models = list(values)
    names = list(values[models[0]])
    colours = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214)]
    w, h, left, bottom = max(640, 60 * len(names) + 120), 420, 60, 110
    img = np.full((h, w, 3), 255, np.uint8)
    plot_h = h - bottom - 40
    for t in (0.0, 0.5, 1.0):
        y = int(h - bottom - t * plot_h)
        cv2.line(img, (left, y), (w - 20, y), (200, 200, 200), 1)
        cv2.putText(img, f"{t:.1f}", (10, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    slot = (w - left - 20) / max(1, len(names))
    bar = slot * 0.8 / len(models)
    for c, name in enumerate(names):
        for k, m in enumerate(models):
            v = values[m].get(name, float("nan"))
            if np.isnan(v):
                continue
            x0 = int(left + c * slot + slot * 0.1 + k * bar)
            cv2.rectangle(img, (x0, int(h - bottom - v * plot_h)), (int(x0 + bar - 1), h - bottom), colours[k % 4], -1)
        org = (int(left + c * slot + slot * 0.3), h - bottom + 10)
        text = np.full((14, 100, 3), 255, np.uint8)
        cv2.putText(text, name[:14], (0, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
        rot = cv2.rotate(text, cv2.ROTATE_90_CLOCKWISE)
        y1, x1 = min(h, org[1] + rot.shape[0]), min(w, org[0] + rot.shape[1])
        img[org[1] : y1, org[0] : x1] = np.minimum(img[org[1] : y1, org[0] : x1], rot[: y1 - org[1], : x1 - org[0]])
    for k, m in enumerate(models):
        cv2.rectangle(img, (left + 150 * k, 10), (left + 150 * k + 12, 22), colours[k % 4], -1)
        cv2.putText(img, m, (left + 150 * k + 18, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    if goal is not None:
        y = int(h - bottom - goal * plot_h)
        for x in range(left, w - 20, 12):
            cv2.line(img, (x, y), (min(x + 6, w - 20), y), (0, 0, 220), 1)
    cv2.imwrite(str(path), img)
    return path


# --------------------------------------------------------------------------- scoring


Encoder = Callable[[list[np.ndarray]], np.ndarray]  # BGR frames → unit embeddings


def encode_paths(paths: Iterable[Path], encoder: Encoder, batch: int = 16) -> np.ndarray:
    paths = list(paths)
    out = []
    for i in range(0, len(paths), batch):
        frames = []
        for p in paths[i : i + batch]:
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"cannot read image {p}")
            frames.append(img)
        out.append(encoder(frames))
    return np.concatenate(out)


def onnx_encoder(model: Path) -> Encoder:
    """Frames → unit embeddings exactly as the camera computes them: the contract's
    Preprocessor and Embedder, with the spec the exporter recorded in the model."""
    from retrofit_agent.contract.embedder import Embedder
    from retrofit_agent.contract.preprocess import Preprocessor

    embedder = Embedder.from_onnx(model)
    pre = Preprocessor(embedder.spec.input)

    def encode(frames: list[np.ndarray]) -> np.ndarray:
        return embedder.embed_many(pre.batch(frames))

    return encode


def evaluate_single_label(embeddings: dict[str, np.ndarray], class_text: np.ndarray, targets: np.ndarray) -> dict:
    """embeddings: model name → (images, dim); the first is the teacher."""
    names = list(embeddings)
    teacher = names[0]
    logits = {m: e @ class_text.T for m, e in embeddings.items()}
    out: dict = {"images": int(len(targets)), "models": {}}
    for m in names:
        row = {"top1": topk_accuracy(logits[m], targets, 1), "top5": topk_accuracy(logits[m], targets, 5)}
        if m != teacher:
            row["top1_agreement_with_teacher"] = float((logits[m].argmax(1) == logits[teacher].argmax(1)).mean())
            row["mean_cosine_to_teacher"] = float((embeddings[m] * embeddings[teacher]).sum(1).mean())
        out["models"][m] = row
    return out


def read_world(folder: Path, limit: int | None = None) -> tuple[list, list[np.ndarray]]:
    """A ``retrofit-model world images`` folder: its records (``ImageRecord``) and pictures (BGR).

    Raises ValueError with one line when the folder is not one.
    """
    from retrofit_agent.train.world.records import ImageRecord

    index = Path(folder) / "captions.jsonl"
    if not index.is_file():
        raise ValueError(f"{folder} has no captions.jsonl (write one with: retrofit-model world images --out {folder})")
    records, frames = [], []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = ImageRecord.model_validate_json(line)
        except ValueError:
            raise ValueError(f"{index}: line {n} is not a world picture record") from None
        image = cv2.imread(str(Path(folder) / record.file), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read {Path(folder) / record.file} (write the set without --shards-only)")
        records.append(record)
        frames.append(image)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{index} lists no pictures")
    return records, frames


def evaluate_world(
    embeddings: dict[str, np.ndarray], bank: np.ndarray, keys: Sequence[str], labels: Sequence[dict[str, str | None]]
) -> dict[str, dict[str, float]]:
    """Per-group top-1 of each model on world pictures, as the camera decides: the best bank row
    within each group (contract.zeroshot.group_argmax) against the picture's label; pictures
    whose label for a group is null (not observable) are skipped for that group. The first
    model is the teacher; the others also get ``agreement/<group>``, the share of pictures on
    which they say what the teacher says."""
    from retrofit_agent.contract.zeroshot import group_argmax, group_index

    groups = [k.partition(".")[0] for k in keys]
    index = group_index(groups)
    names = [groups[int(idx[0])] for idx in index]
    said = {m: group_argmax(e @ bank.T, index) for m, e in embeddings.items()}
    teacher = next(iter(said))
    out: dict[str, dict[str, float]] = {}
    for m, rows in said.items():
        row: dict[str, float] = {}
        for g, name in enumerate(names):
            truth = [(i, lab[name]) for i, lab in enumerate(labels) if lab.get(name) is not None]
            hits = [keys[int(rows[i, g])].partition(".")[2] == t for i, t in truth]
            row[name] = float(np.mean(hits)) if hits else float("nan")
            if m != teacher:
                row[f"agreement/{name}"] = float(np.mean(rows[:, g] == said[teacher][:, g]))
        out[m] = row
    return out


def world_table(results: dict[str, dict[str, float]], goal: float | None = None) -> str:
    models = list(results)
    groups = [g for g in results[models[0]] if "/" not in g]
    lines = [f"{'group':16}" + "".join(f"{m:>14}" for m in models) + ("  int8/teacher" if len(models) > 1 else "")]
    for g in groups:
        row = f"{g:16}" + "".join(f"{results[m][g]:>14.3f}" for m in models)
        if len(models) > 1:
            t, last = results[models[0]][g], results[models[-1]][g]
            row += f"{last / t if t else float('nan'):>14.3f}"
        if goal is not None:
            row += "" if all(results[m][g] >= goal for m in models) else "  < goal"
        lines.append(row)
    lines.append(f"{'mean':16}" + "".join(f"{np.nanmean([results[m][g] for g in groups]):>14.3f}" for m in models))
    return "\n".join(lines)


def evaluate_multi_label(
    embeddings: dict[str, np.ndarray], class_text: np.ndarray, labels: np.ndarray, names: list[str]
) -> dict[str, list[ClassAuroc]]:
    return {m: per_class_auroc(e @ class_text.T, labels, names) for m, e in embeddings.items()}
