"""Each loss part and projector on closed-form inputs whose answer is computed by hand.

Every case pins a number (not just "zero when equal" or "positive otherwise"), so a
wrong scaling, a swapped operand or a missing term fails; and says which operands
receive gradients.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from retrofit_agent.train.config import LossConfig, ProjectorConfig  # noqa: E402
from retrofit_agent.train.losses import (  # noqa: E402
    DistillLoss,
    SpatialShape,
    StudentOutput,
    affinity_kl,
    embed_cosine,
    embedding_weight,
    gl_loss,
    grouped_kl,
)
from retrofit_agent.train.projectors import (  # noqa: E402
    Discriminator,
    GLProjector,
    PCAProjector,
    adversarial_loss,
    attention_map,
    attention_output,
    discriminator_loss,
    mse,
    pca_losses,
    ramp,
    relation_loss,
    resample_map,
    value_relation,
)
from retrofit_agent.train.teacher import LayerFeatures, TeacherFeatures  # noqa: E402
from retrofit_agent.train.zeroshot import ZeroShotBank  # noqa: E402

pytestmark = [pytest.mark.train]

LN3 = math.log(3)
# softmax of one row of (one-hot Q)(one-hot K)ᵀ/√4 = 0.5 on the diagonal, 0 elsewhere:
DIAG = math.exp(0.5) / (math.exp(0.5) + 3)
OFF = 1 / (math.exp(0.5) + 3)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def _eye(n: int = 4) -> torch.Tensor:
    return torch.eye(n).view(1, 1, n, n)


def _bank(rows: torch.Tensor, groups: list[str]) -> ZeroShotBank:
    return ZeroShotBank.build(rows, groups, [f"l{i}" for i in range(len(groups))])


# --------------------------------------------------------------------------- embedding


def test_embedding_cosine_on_vectors_at_known_angles():
    a = torch.tensor([[1.0, 0.0]])
    assert embed_cosine(a, a).item() == pytest.approx(0, abs=1e-7)
    assert embed_cosine(a, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(1.0)
    assert embed_cosine(a, -a).item() == pytest.approx(2.0)
    assert embed_cosine(a, torch.tensor([[0.5, math.sqrt(3) / 2]])).item() == pytest.approx(0.5)  # 60°
    # Mean over the batch: rows at 0° and 90°.
    assert embed_cosine(
        torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ).item() == pytest.approx(0.5)


def test_l2_on_unit_vectors_is_twice_the_cosine_term_so_it_is_merged_into_its_weight():
    s, t = _unit(16, 8, seed=1), _unit(16, 8, seed=2)
    l2 = (s - t).pow(2).sum(-1).mean()
    assert l2.item() == pytest.approx(2 * embed_cosine(s, t).item(), rel=1e-5)
    assert embedding_weight(LossConfig(embed_l2=1.0, embed_cosine=1.0)) == 3.0
    assert embedding_weight(LossConfig(embed_l2=0.5, embed_cosine=0.0)) == 1.0
    assert embedding_weight(LossConfig(embed_l2=0.0, embed_cosine=0.25)) == 0.25


def test_embedding_gradient_reaches_the_student_only():
    s, t = _unit(4, 8, seed=3).requires_grad_(), _unit(4, 8, seed=4)
    embed_cosine(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# --------------------------------------------------------------------------- affinity


def test_grouped_kl_is_the_mean_of_each_groups_kl():
    # Group A = columns 0, 1; group B = columns 2, 3.
    groups = (torch.tensor([0, 1]), torch.tensor([2, 3]))
    teacher = torch.tensor([[0.0, LN3, 0.0, 0.0]])  # A: (1/4, 3/4), B: (1/2, 1/2)
    student = torch.tensor([[0.0, 0.0, 0.0, LN3]])  # A: (1/2, 1/2), B: (1/4, 3/4)
    kl_a = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_b = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert grouped_kl(student, teacher, groups).item() == pytest.approx((kl_a + kl_b) / 2, rel=1e-6)
    # One group over all four: one softmax, (1, 3, 1, 1)/6 against (1, 1, 1, 3)/6.
    flat = (torch.arange(4),)
    kl_flat = (1 / 6) * 0 + (3 / 6) * math.log(3) + (1 / 6) * 0 + (1 / 6) * math.log(1 / 3)
    assert grouped_kl(student, teacher, flat).item() == pytest.approx(kl_flat, rel=1e-6)
    assert grouped_kl(teacher, teacher, groups).item() == 0


def test_affinity_follows_the_bank_groups_and_the_logit_scale():
    bank = _bank(torch.eye(4), ["a", "a", "b", "b"])
    teacher, student = torch.tensor([[0.0, LN3, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0, LN3]])
    kl_a = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl_b = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    # One image: the text→image direction is a softmax over one image, i.e. zero; the mean halves i2t.
    assert affinity_kl(student, teacher, bank, 1.0).item() == pytest.approx((kl_a + kl_b) / 4, rel=1e-6)
    # The logit scale multiplies the cosines, as in the camera's labeller.
    assert affinity_kl(student / 2, teacher / 2, bank, 2.0).item() == pytest.approx((kl_a + kl_b) / 4, rel=1e-6)
    # bank.flat(): one softmax over every label, the earlier recipe.
    kl_flat = 0.5 * math.log(3) + (1 / 6) * math.log(1 / 3)
    assert affinity_kl(student, teacher, bank.flat(), 1.0).item() == pytest.approx(kl_flat / 2, rel=1e-6)


def test_affinity_text_to_image_direction_on_two_images():
    bank = _bank(torch.eye(2), ["a", "b"])  # one label per group: image→text is always 0
    teacher = torch.tensor([[LN3, 0.0], [0.0, 0.0]])  # label 0 over the two images: (3/4, 1/4); label 1: (1/2, 1/2)
    student = torch.tensor([[0.0, 0.0], [0.0, LN3]])  # label 0: (1/2, 1/2); label 1: (1/4, 3/4)
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert affinity_kl(student, teacher, bank, 1.0).item() == pytest.approx((kl0 + kl1) / 2 / 2, rel=1e-6)


def test_affinity_is_float32_under_bf16_autocast_near_convergence():
    t = _unit(32, 64, seed=5)
    s = torch.nn.functional.normalize(
        t + 0.001 * torch.randn(32, 64, generator=torch.Generator().manual_seed(6)), dim=-1
    )
    bank = _bank(_unit(12, 64, seed=7), ["a"] * 4 + ["b"] * 4 + ["c"] * 4)
    exact = affinity_kl(s, t, bank, 100.0).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = affinity_kl(s, t, bank, 100.0).item()
        naive_logits = 100.0 * (s @ bank.embeddings.T), 100.0 * (t @ bank.embeddings.T)  # what bf16 matmuls give
    assert naive_logits[0].dtype == torch.bfloat16
    naive = grouped_kl(naive_logits[0].float(), naive_logits[1].float(), bank.groups).item()
    exact_i2t = grouped_kl(100.0 * s @ bank.embeddings.T, 100.0 * t @ bank.embeddings.T, bank.groups).item()
    print(
        f"[affinity] image→text KL near convergence: fp32 {exact_i2t:.3g}, bf16 logits {naive:.3g} "
        f"({abs(naive - exact_i2t) / exact_i2t:.0%} off)"
    )
    assert under == pytest.approx(exact, rel=1e-6)
    assert abs(naive - exact_i2t) / exact_i2t > 0.05  # why it matters: bf16 logits are far off here


def test_affinity_gradient_reaches_the_student_only_and_not_the_bank():
    bank = _bank(_unit(6, 8, seed=8), ["a", "a", "a", "b", "b", "b"])
    s, t = _unit(4, 8, seed=9).requires_grad_(), _unit(4, 8, seed=10)
    affinity_kl(s, t, bank, 10.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    assert not bank.embeddings.requires_grad and bank.embeddings.grad is None


# --------------------------------------------------------------------------- PCA


def test_attention_map_scales_by_the_square_root_of_the_head_dim():
    a = attention_map(_eye(), _eye())  # one-hot Q = K, d = 4: logits 1/√4 on the diagonal
    expected = torch.full((4, 4), OFF)
    expected.fill_diagonal_(DIAG)
    torch.testing.assert_close(a[0, 0], expected)
    # A 2-dim head: logits 1/√2.
    d2 = attention_map(torch.eye(2).view(1, 1, 2, 2), torch.eye(2).view(1, 1, 2, 2))[0, 0, 0, 0].item()
    assert d2 == pytest.approx(math.exp(2**-0.5) / (math.exp(2**-0.5) + 1))


def test_attention_output_and_value_relation_by_hand():
    v = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]]).view(
        1, 1, 4, 4
    )
    out = attention_output(_eye(), _eye(), v)[0, 0]
    # Row 0: DIAG·v0 + OFF·(v1 + v2 + v3).
    torch.testing.assert_close(out[0], torch.tensor([DIAG, 2 * OFF, 0.0, 4 * OFF]))
    torch.testing.assert_close(out[3], torch.tensor([OFF, 2 * OFF, 0.0, 4 * DIAG]))
    rel = value_relation(v)[0, 0]  # V Vᵀ / √4
    torch.testing.assert_close(rel, torch.diag(torch.tensor([0.5, 2.0, 0.0, 8.0])))


def test_pca_paper_terms_by_hand():
    zero = torch.zeros(1, 1, 4, 4)
    parts = pca_losses(zero, zero, zero, _eye(), _eye(), _eye(), "paper")
    # Student output: uniform attention × V=0 = 0; teacher output: its attention map (V = I).
    assert parts["pca_attention"].item() == pytest.approx((4 * DIAG**2 + 12 * OFF**2) / 16, rel=1e-6)
    # Student relation 0; teacher's I/√4: four entries of 0.5 among 16.
    assert parts["pca_value"].item() == pytest.approx(4 * 0.25 / 16, rel=1e-6)
    # The value term uses the projector's own V, not the substituted one.
    own = pca_losses(zero, zero, _eye(), _eye(), _eye(), _eye(), "paper", student_v=zero)
    assert own["pca_value"].item() == pytest.approx(1 / 16, rel=1e-6)
    assert own["pca_attention"].item() == pytest.approx(
        mse(attention_output(zero, zero, _eye()), attention_output(_eye(), _eye(), _eye())).item()
    )


def test_pca_maps_terms_by_hand():
    zero = torch.zeros(1, 1, 4, 4)
    parts = pca_losses(zero, zero, zero, _eye(), _eye(), _eye(), "maps")
    row = (DIAG - 0.25) ** 2 + 3 * (OFF - 0.25) ** 2  # uniform row vs the teacher's row, summed over keys
    assert parts["pca_attention"].item() == pytest.approx(row, rel=1e-6)
    assert parts["pca_value"].item() == pytest.approx(row, rel=1e-6)  # softmax(V Vᵀ/√d) with V = I
    assert relation_loss(torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).item() == 3.0  # sum over keys, mean over rows
    with pytest.raises(ValueError, match="unknown PCA form"):
        pca_losses(zero, zero, zero, zero, zero, zero, "nope")


@pytest.mark.parametrize("form", ["paper", "maps"])
def test_pca_is_zero_for_the_teachers_own_qkv(form):
    q, k, v = (torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    parts = pca_losses(q, k, v, q, k, v, form)
    assert parts["pca_attention"].item() == 0 and parts["pca_value"].item() == 0


def test_pca_projector_gradients_reach_its_convs_not_the_teacher():
    torch.manual_seed(0)
    pca = PCAProjector(3, width=8, heads=2, substitute_p=0.5).train()
    fmap = torch.randn(2, 3, 4, 4, requires_grad=True)
    tq, tk, tv = (torch.randn(2, 2, 16, 4) for _ in range(3))
    parts = pca(fmap, tq, tk, tv, (4, 4))
    (parts["pca_attention"] + parts["pca_value"]).backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in pca.qkv)
    assert fmap.grad is not None and fmap.grad.abs().sum() > 0  # flows on into the student
    assert tq.grad is None and tk.grad is None and tv.grad is None


def test_pca_full_substitution_is_the_teachers_attention_and_none_is_the_students():
    fmap, t = torch.randn(2, 3, 4, 4), [torch.randn(2, 2, 16, 4) for _ in range(3)]
    full = PCAProjector(3, width=8, heads=2, substitute_p=1.0).train()
    assert full(fmap, *t, (4, 4))["pca_attention"].item() == 0  # g(·) took every entry from the teacher
    assert full.last_substitution_rate == 1.0
    none = PCAProjector(3, width=8, heads=2, substitute_p=0.0).train()
    q, k, v = none.project(fmap, (4, 4))
    expected = pca_losses(q, k, v, *t, "paper", student_v=v)
    got = none(fmap, *t, (4, 4))
    assert got["pca_attention"].item() == pytest.approx(expected["pca_attention"].item())
    assert none.last_substitution_rate == 0.0


@pytest.mark.parametrize("granularity", ["matrix", "element"])
def test_pca_substitutes_teacher_qkv_about_half_the_time(granularity):
    torch.manual_seed(0)
    pca = PCAProjector(8, width=16, heads=2, substitute_p=0.5, granularity=granularity).train()
    fmap = torch.randn(64, 8, 4, 4)
    tq, tk, tv = (torch.randn(64, 2, 16, 8) for _ in range(3))
    rates = []
    for _ in range(20):
        pca(fmap, tq, tk, tv, (4, 4))
        rates.append(pca.last_substitution_rate)
    assert abs(sum(rates) / len(rates) - 0.5) < 0.03
    s = pca.project(fmap, (4, 4))[0]
    mixed = pca.substitute(s, tq)
    from_teacher = (mixed == tq).float()
    assert 0.35 < from_teacher.mean().item() < 0.65
    per_image = from_teacher.flatten(1).mean(1)
    if granularity == "matrix":  # whole matrices: every image all-teacher or all-student
        assert set(per_image.tolist()) <= {0.0, 1.0}
    else:  # entries: every image mixed
        assert ((per_image > 0.3) & (per_image < 0.7)).all()
    pca.eval()
    assert torch.equal(pca.substitute(s, tq), s)  # never at evaluation
    assert pca(fmap, tq, tk, tv, (4, 4)) and pca.last_substitution_rate == 0.0


def test_pca_defaults_are_the_papers_form_and_element_substitution():
    cfg = ProjectorConfig()
    assert (cfg.pca_form, cfg.pca_granularity, cfg.pca_substitute_p) == ("paper", "element", 0.5)
    pca = PCAProjector(3, 8, 2)
    assert (pca.form, pca.granularity, pca.substitute_p) == ("paper", "element", 0.5)


# --------------------------------------------------------------------------- GL and resampling


def test_gl_projector_on_a_7x11_grid_uses_each_neighbourhoods_own_layer():
    gl = GLProjector(3, width=5, grid=(7, 11), group=4, dropout=0.0).eval()
    assert gl.weight.shape == (6, 3, 5) and gl.bias.shape == (6, 5)  # ceil(7/4) x ceil(11/4) groups
    torch.nn.init.normal_(gl.bias)
    x = torch.randn(2, 3, 7, 11)
    y = gl(x).reshape(2, 7, 11, 5)
    for r in range(7):
        for c in range(11):
            g = (r // 4) * 3 + c // 4  # row-major groups; ragged ones at the right and bottom
            torch.testing.assert_close(y[:, r, c], x[:, :, r, c] @ gl.weight[g] + gl.bias[g])
    # Off-diagonal groups really differ: (1, 2) and (0, 2) are separate layers.
    assert not torch.equal(gl.weight[5], gl.weight[2])


def test_gl_projector_maps_efficientnet_b3_grids_onto_vit_l14_tokens():
    for cnn_grid in [(10, 10), (19, 19)]:  # stride 32 and 16 at 300 px; ViT-L/14: 16x16 patches
        fmap = torch.randn(2, 24, *cnn_grid)
        assert resample_map(fmap, (16, 16)).shape == (2, 24, 16, 16)
        q, k, v = PCAProjector(24, width=32, heads=4).project(fmap, (16, 16))
        assert q.shape == k.shape == v.shape == (2, 4, 256, 8)
        gl = GLProjector(24, width=32, grid=(16, 16), group=4)
        assert gl(fmap).shape == (2, 256, 32) and gl.weight.shape == (16, 24, 32)


def test_resample_map_antialiases_when_shrinking_only():
    x = torch.tensor([0.0, 0.0, 0.0, 8.0]).view(1, 1, 1, 4)
    # Antialiased bilinear 4 → 1: triangle weights (5, 7, 7, 5)/24 over the four pixels.
    assert resample_map(x, (1, 1)).item() == pytest.approx(8 * 5 / 24, rel=1e-5)
    same = torch.randn(1, 2, 3, 3)
    assert resample_map(same, (3, 3)) is same
    up = resample_map(torch.ones(1, 1, 2, 2), (4, 4))
    torch.testing.assert_close(up, torch.ones(1, 1, 4, 4))


def test_gl_loss_layer_normalises_the_teacher_tokens():
    tokens = torch.tensor([[[1.0, -1.0], [3.0, 1.0]]])  # each row → (1, -1)/√(1 + 1e-5)
    assert gl_loss(torch.zeros(1, 2, 2), tokens).item() == pytest.approx(1 / (1 + 1e-5), rel=1e-6)
    pred = torch.zeros(1, 2, 2, requires_grad=True)
    gl_loss(pred, tokens).backward()
    torch.testing.assert_close(pred.grad, torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]]]) / 2 / math.sqrt(1 + 1e-5))


# --------------------------------------------------------------------------- the sum


def _features(q: torch.Tensor, tokens: torch.Tensor, n: int = 1) -> TeacherFeatures:
    lf = LayerFeatures(tokens=tokens, q=q, k=q, v=q)
    return TeacherFeatures(embedding=_unit(q.shape[0], 4, seed=11), layers=(lf,) * n, grid=(2, 2))


def test_distill_loss_total_is_the_weighted_sum_of_its_parts():
    cfg = LossConfig(
        embed_l2=0.5, embed_cosine=1.0, affinity=2.0, pca_attention=3.0, pca_value=0.0, gl=4.0, adversarial=0.0
    )
    loss = DistillLoss(
        cfg, ProjectorConfig(gl_dropout=0.0, pca_substitute_p=0.0), SpatialShape(3, 4, 2, (2, 2), 2), 10.0
    )
    assert len(loss.pca) == 2 and len(loss.gl) == 2  # one projector pair per teacher block
    bank = _bank(_unit(4, 4, seed=12), ["a", "a", "b", "b"])
    teacher = _features(torch.randn(2, 2, 4, 2), torch.randn(2, 4, 4), n=2)
    student = StudentOutput(_unit(2, 4, seed=13), torch.randn(2, 3, 2, 2))
    parts = loss(student, teacher, bank)
    assert set(parts) == {"embed", "affinity", "pca_attention", "pca_value", "gl", "total"}
    expected = 2.0 * parts["embed"] + 2.0 * parts["affinity"] + 3.0 * parts["pca_attention"] + 4.0 * parts["gl"]
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["affinity"].item() == pytest.approx(
        affinity_kl(student.embedding, teacher.embedding, bank, 10.0).item()
    )
    per_block = [gl_loss(g(student.feature_map), teacher.patch(lf.tokens)) for g, lf in zip(loss.gl, teacher.layers)]
    assert parts["gl"].item() == pytest.approx(sum(p.item() for p in per_block) / 2, rel=1e-6)
    flat = DistillLoss(
        cfg.model_copy(update={"affinity_softmax": "flat"}), ProjectorConfig(), SpatialShape(3, 4, 2, (2, 2), 1), 10.0
    )
    assert flat(student, _features(torch.randn(2, 2, 4, 2), torch.randn(2, 4, 4)), bank)[
        "affinity"
    ].item() == pytest.approx(affinity_kl(student.embedding, teacher.embedding, bank.flat(), 10.0).item())


def test_distill_loss_temperature_overrides_the_teachers_logit_scale():
    assert DistillLoss(LossConfig(), ProjectorConfig(), None, 14.0).logit_scale == 14.0
    assert DistillLoss(
        LossConfig(affinity_temperature=0.05), ProjectorConfig(), None, 14.0
    ).logit_scale == pytest.approx(20.0)
    with pytest.raises(ValueError, match="spatial shape"):
        DistillLoss(LossConfig(gl=1.0), ProjectorConfig(), None, 14.0)
    with pytest.raises(ValueError, match="teacher's tokens"):
        DistillLoss(LossConfig(gl=1.0), ProjectorConfig(), SpatialShape(3, 4, 2, (2, 2), 1), 1.0)(
            StudentOutput(_unit(2, 4)), _unit(2, 4), None
        )


def test_distill_loss_without_a_bank_or_weights_leaves_those_parts_out():
    loss = DistillLoss(LossConfig(embed_l2=0, embed_cosine=0, affinity=1.0), ProjectorConfig(), None, 1.0)
    parts = loss(StudentOutput(_unit(2, 4)), _unit(2, 4, seed=1), None)
    assert set(parts) == {"total"} and parts["total"] == 0


# --------------------------------------------------------------------------- adversarial


def _constant_discriminator(logit: float) -> Discriminator:
    d = Discriminator(8, 16)
    torch.nn.init.zeros_(d.net[-1].weight)
    torch.nn.init.constant_(d.net[-1].bias, logit)
    return d


@pytest.mark.parametrize("x", [-3.0, 0.0, 0.5, 4.0])
def test_discriminator_and_adversarial_losses_at_a_fixed_logit(x):
    d, e = _constant_discriminator(x), _unit(32, 8)
    # Real (teacher, label 1) at logit x: log1p(e^-x); fake (student, label 0): log1p(e^x).
    assert discriminator_loss(d, e, e).item() == pytest.approx(
        math.log1p(math.exp(-x)) + math.log1p(math.exp(x)), rel=1e-6
    )
    assert adversarial_loss(d, e).item() == pytest.approx(math.log1p(math.exp(-x)), rel=1e-6)


def test_discriminator_loss_trains_the_discriminator_only():
    d = Discriminator(8, 16)
    s, t = _unit(4, 8, seed=1).requires_grad_(), _unit(4, 8, seed=2).requires_grad_()
    discriminator_loss(d, t, s).backward()
    assert all(p.grad is not None for p in d.parameters())
    assert s.grad is None and t.grad is None  # both sides are detached


def test_adversarial_loss_reaches_the_student_through_a_frozen_discriminator():
    d = Discriminator(8, 16).requires_grad_(False)
    s = _unit(4, 8, seed=3).requires_grad_()
    adversarial_loss(d, s).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())


def test_discriminator_runs_in_float32_under_autocast():
    d = Discriminator(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert d(_unit(2, 8)).dtype == torch.float32


def test_adversarial_ramp():
    assert [ramp(0.1, e, 2.0) for e in (0, 1, 2, 5)] == pytest.approx([0, 0.05, 0.1, 0.1])
    assert ramp(0.1, -1, 2.0) == 0.0
    assert ramp(0.1, 0, 0) == 0.1


def test_warmup_cosine_schedule():
    from retrofit_agent.train.setup import WarmupCosine

    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half-way down the cosine
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert WarmupCosine(0, 0, 0.0)(0) == pytest.approx(1.0)


# --------------------------------------------------------------------------- edges the mutation run found


def test_attention_scales_by_the_head_dim_not_the_token_count_and_softmaxes_over_keys():
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]).view(1, 1, 3, 4)  # N=3, d=4
    k = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]]).view(1, 1, 3, 4)
    a = attention_map(q, k)[0, 0]
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 4.0], [2.0, 0.0, 4.0]]) / 2  # QKᵀ/√4
    torch.testing.assert_close(a, torch.softmax(logits, dim=-1))  # rows (queries) sum to 1
    v = torch.arange(12.0).view(1, 1, 3, 4)
    torch.testing.assert_close(value_relation(v)[0, 0], v[0, 0] @ v[0, 0].T / 2)  # /√d with d=4, N=3


def test_pca_losses_default_to_the_papers_form():
    zero = torch.zeros(1, 1, 4, 4)
    assert pca_losses(zero, zero, zero, _eye(), _eye(), _eye())["pca_value"].item() == pytest.approx(1 / 16)


def test_pca_projector_uses_its_form_and_its_own_v_for_the_value_term():
    fmap, t = torch.randn(2, 3, 4, 4), [torch.randn(2, 2, 16, 4) for _ in range(3)]
    assert PCAProjector(3, 8, 2).last_substitution_rate == 0.0
    full = PCAProjector(3, width=8, heads=2, substitute_p=1.0).train()
    own_v = full.project(fmap, (4, 4))[2]
    parts = full(fmap, *t, (4, 4))
    assert parts["pca_value"].item() == pytest.approx(mse(value_relation(own_v), value_relation(t[2])).item(), rel=1e-6)
    assert parts["pca_value"].item() > 0  # not the substituted (teacher's) V, which would give 0
    maps = PCAProjector(3, width=8, heads=2, substitute_p=0.0, form="maps").train()
    q, k, v = maps.project(fmap, (4, 4))
    assert maps(fmap, *t, (4, 4))["pca_attention"].item() == pytest.approx(
        pca_losses(q, k, v, *t, "maps")["pca_attention"].item()
    )


def test_gl_projector_defaults_to_4x4_groups_and_a_linear_layers_init():
    gl = GLProjector(16, width=64, grid=(8, 8))
    assert gl.group == 4 and gl.weight.shape[0] == 4 and gl.dropout.p == 0.1
    bound = 1 / math.sqrt(16)
    assert gl.weight.min().item() >= -bound and gl.weight.max().item() <= bound
    assert gl.weight.min().item() < -0.9 * bound and gl.weight.max().item() > 0.9 * bound
    assert torch.equal(gl.bias, torch.zeros_like(gl.bias))


def test_gl_projector_keeps_the_feature_maps_dtype():
    gl = GLProjector(3, width=5, grid=(2, 2), group=2, dropout=0.0)
    assert gl(torch.randn(1, 3, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_resample_map_antialiases_when_either_side_shrinks_on_non_square_grids():
    x = torch.tensor([0.0, 0.0, 0.0, 8.0]).view(1, 1, 4, 1)  # a column shrinking 4 → 1, one channel
    assert resample_map(x, (1, 1)).item() == pytest.approx(8 * 5 / 24, rel=1e-5)
    wide = torch.tensor([0.0, 0.0, 0.0, 8.0]).view(1, 1, 4, 1).expand(1, 1, 4, 2).contiguous()
    assert resample_map(wide, (1, 4))[0, 0, 0, 0].item() == pytest.approx(8 * 5 / 24, rel=1e-5)


def test_the_discriminator_is_a_three_layer_leaky_mlp():
    d = Discriminator(2, 2)
    linears = [m for m in d.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 2), (2, 2), (2, 1)]
    assert [m.negative_slope for m in d.net if isinstance(m, torch.nn.LeakyReLU)] == [0.2, 0.2]
    with torch.no_grad():
        for m in linears[:2]:
            m.weight.copy_(torch.eye(2))
            m.bias.zero_()
        linears[2].weight.copy_(torch.ones(1, 2))
        linears[2].bias.zero_()
    # (-1, 2) → leaky → (-0.2, 2) → leaky → (-0.04, 2) → sum.
    out = d(torch.tensor([[-1.0, 2.0], [1.0, 1.0]]))
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([1.96, 2.0]))
    assert Discriminator(8).net[0].out_features == 512


def test_ramp_with_a_fraction_of_an_epoch():
    assert ramp(0.1, 0.25, 0.5) == pytest.approx(0.05)


def test_grouped_kl_averages_over_images():
    groups = (torch.tensor([0, 1]),)
    teacher = torch.tensor([[0.0, LN3], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    kl0 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert grouped_kl(student, teacher, groups).item() == pytest.approx(kl0 / 2, rel=1e-6)


def _one_layer_loss(**loss) -> DistillLoss:
    return DistillLoss(
        LossConfig(**{"embed_l2": 0.0, "embed_cosine": 0.0, "affinity": 0.0, **loss}),
        ProjectorConfig(),
        SpatialShape(3, 4, 2, (2, 2), 1),
        1.0,
    )


def test_each_part_is_on_for_any_positive_weight_and_off_at_zero():
    student, teacher = (
        StudentOutput(_unit(2, 4, seed=1), torch.randn(2, 3, 2, 2)),
        _features(torch.randn(2, 2, 4, 2), torch.randn(2, 4, 4)),
    )
    bank = _bank(_unit(2, 4, seed=2), ["a", "b"])
    assert "embed" in _one_layer_loss(embed_cosine=0.5)(student, teacher, bank)
    assert "affinity" in _one_layer_loss(affinity=0.5)(student, teacher, bank)
    assert "affinity" not in _one_layer_loss(affinity=0.0)(student, teacher, bank)
    assert _one_layer_loss(pca_attention=0.5).pca is not None and _one_layer_loss(pca_value=0.5).pca is not None
    assert _one_layer_loss(gl=0.5).pca is None and _one_layer_loss(gl=0.5).gl is not None


def test_projector_settings_reach_every_pca_projector():
    loss = DistillLoss(
        LossConfig(pca_attention=1.0),
        ProjectorConfig(pca_granularity="matrix", pca_form="maps", pca_substitute_p=0.25),
        SpatialShape(3, 4, 2, (2, 2), 2),
        1.0,
    )
    assert [(p.granularity, p.form, p.substitute_p) for p in loss.pca] == [("matrix", "maps", 0.25)] * 2


def test_pca_parts_are_the_mean_over_teacher_blocks_on_the_configured_grid():
    cfg = LossConfig(embed_l2=0, embed_cosine=0, affinity=0, pca_attention=1.0, pca_value=1.0)
    loss = DistillLoss(cfg, ProjectorConfig(pca_substitute_p=0.0), SpatialShape(3, 4, 2, (2, 2), 2), 1.0)
    teacher = TeacherFeatures(
        embedding=_unit(2, 4),
        grid=(2, 2),
        layers=tuple(
            LayerFeatures(
                tokens=torch.randn(2, 4, 4),
                q=torch.randn(2, 2, 4, 2),
                k=torch.randn(2, 2, 4, 2),
                v=torch.randn(2, 2, 4, 2),
            )
            for _ in range(2)
        ),
    )
    fmap = torch.randn(2, 3, 2, 2)
    parts = loss(StudentOutput(_unit(2, 4, seed=3), fmap), teacher, None)
    per = [p(fmap, lf.q, lf.k, lf.v, (2, 2)) for p, lf in zip(loss.pca, teacher.layers)]
    for name in ("pca_attention", "pca_value"):
        assert parts[name].item() == pytest.approx((per[0][name] + per[1][name]).item() / 2, rel=1e-6)


def test_adversarial_part_uses_the_discriminator_and_the_ramped_weight():
    d, x = _constant_discriminator(2.0), 2.0
    student = StudentOutput(_unit(4, 8))
    loss = DistillLoss(
        LossConfig(embed_l2=0, embed_cosine=0, affinity=0, adversarial=0.5), ProjectorConfig(), None, 1.0
    )
    parts = loss(student, _unit(4, 8, seed=1), None, d, 0.25)
    assert parts["adversarial"].item() == pytest.approx(math.log1p(math.exp(-x)), rel=1e-6)
    assert parts["total"].item() == pytest.approx(0.25 * math.log1p(math.exp(-x)), rel=1e-6)
    assert loss(student, _unit(4, 8, seed=1), None, d)["total"].item() == 0  # weight 0 until the ramp starts
    assert "adversarial" not in loss(student, _unit(4, 8, seed=1), None)  # no discriminator
    off = DistillLoss(LossConfig(embed_l2=0, embed_cosine=0, affinity=0, adversarial=0.0), ProjectorConfig(), None, 1.0)
    assert "adversarial" not in off(student, _unit(4, 8, seed=1), None, d, 1.0)


def test_feature_losses_need_both_the_teachers_features_and_the_students_map():
    loss = _one_layer_loss(gl=1.0)
    message = r"^PCA/GL losses need the teacher's tokens and the student's feature map$"
    with pytest.raises(ValueError, match=message):
        loss(StudentOutput(_unit(2, 4), torch.randn(2, 3, 2, 2)), _unit(2, 4), None)  # a map, but no teacher tokens
    with pytest.raises(ValueError, match=message):
        loss(
            StudentOutput(_unit(2, 4)), _features(torch.randn(2, 2, 4, 2), torch.randn(2, 4, 4)), None
        )  # tokens, no map
    with pytest.raises(ValueError, match=r"^PCA/GL losses need the spatial shape of student and teacher$"):
        DistillLoss(LossConfig(gl=1.0), ProjectorConfig(), None, 1.0)
