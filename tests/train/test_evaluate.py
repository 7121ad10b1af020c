"""Evaluation metrics and the Cityscapes converter on fixtures with hand-computable answers."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from retrofit_agent.train.evaluate import (
    auroc,
    auroc_chart,
    auroc_table,
    cityscapes_index,
    evaluate_multi_label,
    evaluate_single_label,
    mean_auroc,
    topk_accuracy,
)

pytestmark = pytest.mark.train


def test_auroc_known_answers():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # pos {0.4, 0.8}, neg {0.3, 0.5}: pairs won 0.4>0.3, 0.8>0.3, 0.8>0.5 → 3 of 4
    assert auroc([0.3, 0.4, 0.5, 0.8], [0, 1, 0, 1]) == 0.75
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert auroc([0.5, 0.5, 0.1], [1, 0, 0]) == 0.75
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))


def test_topk():
    logits = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.4], [0.5, 0.6, 0.1]])
    targets = np.array([0, 0, 0])
    assert topk_accuracy(logits, targets, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, targets, 2) == pytest.approx(2 / 3)


def write_cityscapes(root: Path) -> None:
    """Two images in Cityscapes' layout with known classes present."""
    for city, stem, ids in (
        ("aachen", "aachen_000000_000019", [7, 26, 23]),
        ("bremen", "bremen_000001_000019", [7, 24, 0, 1]),
    ):
        label = np.zeros((64, 128), np.uint8)
        for k, i in enumerate(ids):
            label[:, k * 20 : (k + 1) * 20] = i
        d = root / "gtFine" / "val" / city
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{stem}_gtFine_labelIds.png"), label)
        img = root / "leftImg8bit" / "val" / city
        img.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img / f"{stem}_leftImg8bit.png"), np.zeros((64, 128, 3), np.uint8))


def test_cityscapes_converter(tmp_path):
    write_cityscapes(tmp_path)
    index = cityscapes_index(tmp_path, "val")
    assert [r["labels"] for r in index] == [["road", "sky", "car"], ["road", "person"]]
    assert all(Path(r["image"]).is_file() for r in index)
    assert cityscapes_index(tmp_path, "val", min_pixels=64 * 20 + 1)[0]["labels"] == []


def test_multi_label_evaluation_with_hand_computable_scores(tmp_path):
    names = ["road", "car"]
    text = np.eye(2, dtype=np.float32)  # class text embeddings
    # 4 images; embeddings chosen so the cosine to "car" is 0.9, 0.2, 0.6, 0.1
    car = np.array([0.9, 0.2, 0.6, 0.1])
    emb = np.stack([np.sqrt(1 - car**2), car], axis=1)
    labels = np.array([[1, 1], [1, 0], [1, 0], [0, 1]], dtype=bool)
    res = evaluate_multi_label({"teacher": emb, "student": emb[:, ::-1].copy()}, text, labels, names)
    t = {r.name: r for r in res["teacher"]}
    # car positives {0.9, 0.1}, negatives {0.2, 0.6}: 0.9 beats both, 0.1 beats none → 0.5
    assert t["car"].auroc == 0.5 and (t["car"].positives, t["car"].negatives) == (2, 2)
    # road positives images 0-2 with road cosine sqrt(1-c²): .436, .980, .800 vs negative .995 → 0
    assert t["road"].auroc == 0.0
    assert mean_auroc(res["teacher"]) == 0.25
    table = auroc_table(res)
    assert "car" in table and "mean" in table
    png = auroc_chart(res, tmp_path / "auroc.png")
    assert cv2.imread(str(png)).shape[2] == 3


def test_single_label_evaluation():
    text = np.eye(3, dtype=np.float32)
    teacher = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    student = np.eye(3, dtype=np.float32)[[0, 1, 1, 0]]
    out = evaluate_single_label({"teacher": teacher, "student_fp32": student}, text, np.array([0, 1, 2, 0]))
    assert out["models"]["teacher"]["top1"] == 1.0
    assert out["models"]["student_fp32"]["top1"] == 0.75
    assert out["models"]["student_fp32"]["top1_agreement_with_teacher"] == 0.75
    assert out["models"]["student_fp32"]["mean_cosine_to_teacher"] == 0.75
