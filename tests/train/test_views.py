"""One view for both: the teacher's spatial targets describe the pixels the student sees.

The oracle student predicts the teacher's local features of its own input exactly: it
takes the very tensor the student receives, converts it to the teacher's normalisation
and asks the teacher. Its spatial losses must then be zero; with the earlier recipe (the
teacher on the clean image) a crop alone moves every position away from its target.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from retrofit_agent.train.augment import Normalisation  # noqa: E402
from retrofit_agent.train.engine import Distiller  # noqa: E402
from retrofit_agent.train.losses import gl_loss  # noqa: E402
from retrofit_agent.train.projectors import pca_losses  # noqa: E402
from train_helpers import images, tiny_config  # noqa: E402,F401  (images is a fixture)

pytestmark = [pytest.mark.train]

CROP_ONLY = {"p_color": 0.0, "p_crop": 1.0, "p_rotate": 0.0, "p_mask": 0.0}


def _oracle_gap(tmp_path: Path, images: Path, teacher_view: str, overrides: dict | None = None) -> dict[str, float]:
    from retrofit_agent.contract.settings import deep_merge

    sections = deep_merge(
        {
            "augment": {**CROP_ONLY, "teacher_view": teacher_view},
            "teacher": {"layer": [-1, -2]},
            "data": {"batch_size": 16, "max_images": 64, "holdout": 0},
        },
        overrides or {},
    )
    cfg = tiny_config(tmp_path / teacher_view, [str(images)], **sections)
    d = Distiller(cfg)
    batch = next(iter(d.data.loader))
    views = d.views(batch, step=5)
    # The oracle: the student's input tensor → RGB → the teacher's normalisation and size → the teacher.
    s_mean, s_std = Normalisation(d.student.mean, d.student.std).tensors(views.student)
    t_mean, t_std = Normalisation(d.teacher.mean, d.teacher.std).tensors(views.student)
    rgb = views.student * s_std + s_mean
    size = (d.teacher.image_size, d.teacher.image_size)
    if tuple(rgb.shape[-2:]) != size:
        rgb = torch.nn.functional.interpolate(rgb, size=size, mode="bilinear", antialias=True)
    oracle = d.teacher.forward_features((rgb - t_mean) / t_std, cfg.teacher.layers)
    target = views.target
    cos, gl, pca = [], [], []
    for o, t in zip(oracle.layers, target.layers):
        ot, tt = oracle.patch(o.tokens), target.patch(t.tokens)
        cos.append(torch.nn.functional.cosine_similarity(ot, tt, dim=-1).mean().item())
        gl.append(gl_loss(torch.nn.functional.layer_norm(ot, ot.shape[-1:]), tt).item())
        q, k, v = (oracle.patch(x) for x in (o.q, o.k, o.v))
        tq, tk, tv = (target.patch(x) for x in (t.q, t.k, t.v))
        pca.append(sum(x.item() for x in pca_losses(q, k, v, tq, tk, tv, "paper").values()))
    return {"cosine": sum(cos) / len(cos), "gl": sum(gl) / len(gl), "pca": sum(pca) / len(pca)}


def test_with_one_view_for_both_an_exact_student_has_zero_spatial_loss(tmp_path: Path, images: Path, capsys):
    same = _oracle_gap(tmp_path, images, "same")
    clean = _oracle_gap(tmp_path, images, "clean")
    with capsys.disabled():
        print(
            f"\n[views] crop only, exact student: per-position cosine to the teacher's targets "
            f"clean {clean['cosine']:.3f} -> same {same['cosine']:.6f}; GL loss {clean['gl']:.4f} -> {same['gl']:.2e}; "
            f"PCA (paper) {clean['pca']:.4f} -> {same['pca']:.2e}"
        )
    assert same["cosine"] > 0.99999 and same["gl"] < 1e-6 and same["pca"] < 1e-6
    assert clean["cosine"] < 0.95 and clean["gl"] > 100 * max(same["gl"], 1e-8)


def test_the_clean_recipe_stays_selectable_and_repeats_targets_per_view(tmp_path: Path, images: Path):
    cfg = tiny_config(
        tmp_path / "c",
        [str(images)],
        augment={"teacher_view": "clean", "views": 2},
        data={"batch_size": 8, "max_images": 32, "holdout": 0},
    )
    d = Distiller(cfg)
    batch = next(iter(d.data.loader))
    v = d.views(batch, step=0)
    assert v.student.shape[0] == 16 and torch.equal(v.index, batch["index"].repeat(2))
    # Both views of an image share the clean image's targets; the student's views differ.
    torch.testing.assert_close(v.target.embedding[:8], v.target.embedding[8:])
    assert not torch.equal(v.student[:8], v.student[8:])
    clean = d.teacher.forward_features(batch["teacher"], cfg.teacher.layers)
    torch.testing.assert_close(v.target.embedding[:8], clean.embedding)
