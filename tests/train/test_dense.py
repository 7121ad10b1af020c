"""Dense zero-shot cells (issue 15), the training half: the student's per-cell head, the teacher's
per-patch embeddings (MaskCLIP) and the dense distillation term."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.train]
torch = pytest.importorskip("torch")

from torch.nn import functional as F  # noqa: E402

from retrofit_agent.contract.errors import ConfigError  # noqa: E402
from retrofit_agent.train.config import LossConfig, ProjectorConfig, load_distill_config  # noqa: E402
from retrofit_agent.train.losses import DistillLoss, StudentOutput, dense_cosine, resample_cells  # noqa: E402
from retrofit_agent.train.student import Student  # noqa: E402
from retrofit_agent.train.teacher import Teacher, TeacherFeatures  # noqa: E402
from train_helpers import TINY  # noqa: E402


@pytest.fixture(scope="module")
def student() -> Student:
    torch.manual_seed(0)
    return Student("test_efficientnet", embed_dim=32, hidden_dim=64, input_size=96).eval()


@pytest.fixture(scope="module")
def vit_teacher() -> Teacher:
    return Teacher("retrofit-micro-clip", None, seed=0)  # ViT, 32 px, 8x8 patches


@pytest.fixture(scope="module")
def rn_teacher() -> Teacher:
    return Teacher("retrofit-ci-clip-rn", None, seed=0)  # ModifiedResNet with attention pooling, 64 px


# --------------------------------------------------------------------------- student


def test_the_dense_head_is_the_pooled_head_applied_to_every_cell(student: Student):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb, cells = student.forward_dense(x)
        fmap = student.backbone.forward_features(x)
        assert torch.equal(emb, student(x)), "the pooled embedding is exactly what forward() gives"
        assert cells.shape == (2, 3, 3, 32) and student.cell_grid == (3, 3)
        for i in range(3):
            for j in range(3):
                by_hand = F.normalize(student.head(fmap[:, :, i, j]), dim=-1)
                torch.testing.assert_close(cells[:, i, j], by_hand, atol=1e-5, rtol=0)
    assert torch.allclose(cells.norm(dim=-1), torch.ones(2, 3, 3))
    assert not torch.allclose(cells[:, 0, 0], cells[:, 2, 2], atol=1e-3), "cells differ where the image does"


def test_one_pass_gives_the_projectors_map_and_the_cells_as_separate_calls_do(student: Student):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb, fmap, cells = student.forward_dense_with_features(x, -2)
        emb2, fmap2 = student.forward_with_features(x, -2)
        _, cells2 = student.forward_dense(x)
    torch.testing.assert_close(emb, emb2)
    torch.testing.assert_close(fmap, fmap2)
    torch.testing.assert_close(cells, cells2)


def test_cell_grids_of_efficientnet_b3_and_a_backbone_without_a_spatial_map():
    b3 = Student("efficientnet_b3", embed_dim=16, hidden_dim=16, input_size=300)
    assert b3.cell_grid == (10, 10)
    b3.input_size = (160, 160)  # remeasured at the new size
    assert b3.cell_grid == (5, 5)
    assert b3.training, "measuring the grid leaves the train/eval mode as it was"
    vit = Student("test_vit", embed_dim=16, hidden_dim=16, input_size=160)
    assert not vit.has_cells
    with pytest.raises(ValueError, match="no spatial map"):
        vit.cell_grid  # noqa: B018


# --------------------------------------------------------------------------- teacher


def test_vit_patches_take_the_class_tokens_path_through_ln_post_and_proj(vit_teacher: Teacher):
    t, visual = vit_teacher, vit_teacher.model.visual
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    seen: dict[str, torch.Tensor] = {}
    hook = visual.transformer.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    try:
        emb, dense = t.encode_image_and_dense(x)
    finally:
        hook.remove()
    # The class token through the same ln_post and proj is the image embedding...
    cls = F.normalize(visual.ln_post(seen["out"][:, 0]) @ visual.proj, dim=-1)
    torch.testing.assert_close(cls, t.encode_image(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(emb, t.encode_image(x))
    # ...and the patches, laid out as open_clip lays its own NCHW intermediates out (row-major).
    inter = visual.forward_intermediates(
        x, indices=[len(visual.transformer.resblocks) - 1], normalize_intermediates=True
    )
    ref = F.normalize(inter["image_intermediates"][0].permute(0, 2, 3, 1) @ visual.proj, dim=-1)
    assert dense.shape == (2, 8, 8, t.embed_dim) == (2, *t.dense_grid, t.embed_dim)
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(t.encode_dense(x), dense)


def test_resnet_cells_are_the_attention_pools_values_of_each_position(rn_teacher: Teacher):
    t = rn_teacher
    pool = t.model.visual.attnpool
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    seen: dict[str, torch.Tensor] = {}
    hook = pool.register_forward_pre_hook(lambda m, i: seen.__setitem__("map", i[0]))
    try:
        dense = t.encode_dense(x)
    finally:
        hook.remove()
    fmap = seen["map"]  # (2, C, 2, 2)
    assert dense.shape == (2, 2, 2, t.embed_dim) and t.dense_grid == (2, 2)
    h, w = fmap.shape[2:]
    for i in range(h):
        for j in range(w):
            value = pool.v_proj(fmap[:, :, i, j] + pool.positional_embedding[1 + i * w + j])
            torch.testing.assert_close(dense[:, i, j], F.normalize(pool.c_proj(value), dim=-1), atol=1e-5, rtol=0)


def test_with_uniform_attention_the_pool_returns_the_mean_of_the_resnet_cells():
    t = Teacher("retrofit-ci-clip-rn", None, seed=1)
    pool = t.model.visual.attnpool
    with torch.no_grad():  # every key alike: softmax is uniform over the mean token and the cells
        pool.q_proj.weight.zero_()
        pool.k_proj.weight.zero_()
        # The mean token's position is the cells' mean position, so its value is the cells' mean value.
        pool.positional_embedding[0] = pool.positional_embedding[1:].mean(0)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    seen: dict[str, torch.Tensor] = {}
    hook = t.model.visual.attnpool.register_forward_pre_hook(lambda m, i: seen.__setitem__("map", i[0]))
    try:
        pooled = t.model.encode_image(x)
    finally:
        hook.remove()
    raw = t._dense_from(seen["map"], normalize=False)
    torch.testing.assert_close(raw.mean(dim=(1, 2)), pooled, atol=1e-5, rtol=1e-5)


def test_a_tower_without_per_patch_embeddings_is_refused_with_one_line(vit_teacher: Teacher):
    visual = vit_teacher.model.visual
    visual.attn_pool = torch.nn.Identity()  # an attentional pooler (CoCa): patch tokens are not pooled by proj
    try:
        with pytest.raises(ConfigError, match="no per-patch embeddings.*loss.dense to 0"):
            vit_teacher.check_dense()
    finally:
        visual.attn_pool = None


# --------------------------------------------------------------------------- the dense loss


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_dense_loss_is_zero_for_identical_cells_and_grows_when_they_are_shuffled():
    cells = _unit(4, 5, 5, 16)
    assert dense_cosine(cells, cells).item() == pytest.approx(0.0, abs=1e-6)
    shuffled = cells.reshape(4, 25, 16)[:, torch.randperm(25, generator=torch.Generator().manual_seed(1))]
    loss = dense_cosine(cells, shuffled.reshape(4, 5, 5, 16)).item()
    assert loss > 0.5  # random unit vectors in 16-d: 1 − cos averages 1
    opposite = dense_cosine(cells, -cells).item()
    assert opposite == pytest.approx(2.0, abs=1e-5)


def test_dense_loss_on_the_teachers_own_patches_prefers_the_aligned_view_to_its_mirror(vit_teacher: Teacher):
    """A student that reproduced the teacher's cells on a picture: the target of the same view costs
    nothing, the target of the horizontally flipped view (what a misaligned augmentation gives) does."""
    x = torch.zeros(2, 3, 32, 32)
    x[:, 0, :, :12] = 2.0  # something on the left only
    x[:, 2, 20:, 24:] = -2.0
    target = vit_teacher.encode_dense(x)
    flipped = vit_teacher.encode_dense(torch.flip(x, dims=[3]))
    student_cells = resample_cells(target, (4, 4))  # a perfect student on a coarser grid
    aligned, mirrored = dense_cosine(student_cells, target).item(), dense_cosine(student_cells, flipped).item()
    assert aligned < 1e-5
    assert mirrored > 10 * max(aligned, 1e-3)


def test_resampling_averages_a_finer_grid_and_interpolates_a_coarser_one():
    fine = torch.zeros(1, 4, 4, 2)
    fine[0, :2, :2, 0] = 1.0  # top-left quadrant points along x, the rest along y
    fine[0, :, :, 1] = 1.0 - fine[0, :, :, 0]
    coarse = resample_cells(fine, (2, 2))
    torch.testing.assert_close(coarse[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(coarse[0, 1, 1], torch.tensor([0.0, 1.0]))
    up = resample_cells(coarse, (4, 4))
    assert up.shape == (1, 4, 4, 2)
    torch.testing.assert_close(up.norm(dim=-1), torch.ones(1, 4, 4))  # normalised again
    assert up[0, 0, 0, 0] > up[0, 3, 3, 0]


def test_the_dense_part_is_named_weighted_and_needs_both_sides():
    loss = DistillLoss(LossConfig(embed_l2=0, affinity=0, dense=0.5), ProjectorConfig(), None, 100.0)
    assert loss.needs_cells
    s_emb, cells, t_dense = _unit(2, 8), _unit(2, 3, 3, 8, seed=1), _unit(2, 6, 6, 8, seed=2)
    target = TeacherFeatures(embedding=_unit(2, 8, seed=3), layers=(), grid=(6, 6), dense=t_dense)
    parts = loss(StudentOutput(s_emb, cells=cells), target, None)
    assert set(parts) == {"embed", "dense", "total"}
    torch.testing.assert_close(parts["dense"], dense_cosine(cells, t_dense))
    torch.testing.assert_close(parts["total"], parts["embed"] + 0.5 * parts["dense"])
    with pytest.raises(ValueError, match="dense loss needs"):
        loss(StudentOutput(s_emb), target, None)
    off = DistillLoss(LossConfig(), ProjectorConfig(), None, 100.0)
    assert not off.needs_cells and "dense" not in off(StudentOutput(s_emb), target.embedding, None)


def test_config_default_has_no_dense_term_and_refuses_it_where_views_would_misalign():
    assert load_distill_config(TINY).loss.dense == 0
    with pytest.raises(ConfigError, match="loss.dense compares positions.*teacher_view = 'same'"):
        load_distill_config(TINY, {"loss": {"dense": 1.0}, "augment": {"teacher_view": "clean"}})
    # Without crops and rotations a clean teacher view is still the student's view.
    ok = {"loss": {"dense": 1.0}, "augment": {"teacher_view": "clean", "p_crop": 0.0, "p_rotate": 0.0}}
    assert load_distill_config(TINY, ok).loss.dense == 1.0
