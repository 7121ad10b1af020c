"""Each loss part and projector on inputs whose answer is known."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from retrofit_agent.train.losses import affinity_kl, embed_cosine, embed_l2  # noqa: E402
from retrofit_agent.train.projectors import (  # noqa: E402
    Discriminator, GLProjector, PCAProjector, adversarial_loss, attention_map, discriminator_loss, pca_losses, ramp,
    resample_map,
)

pytestmark = [pytest.mark.train]


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_identical_embeddings_give_zero_embedding_and_affinity_losses():
    t, bank = _unit(8, 32), _unit(10, 32, seed=1)
    assert embed_l2(t, t).item() == 0
    assert embed_cosine(t, t).item() == pytest.approx(0, abs=1e-6)
    assert affinity_kl(t, t, bank, 0.01).item() == pytest.approx(0, abs=1e-6)


def test_embedding_losses_on_orthogonal_and_opposite_vectors():
    a = torch.eye(4)[:2]
    b = torch.eye(4)[2:]
    assert embed_l2(a, b).item() == pytest.approx(2.0)  # |a - b|² of orthogonal unit vectors
    assert embed_cosine(a, b).item() == pytest.approx(1.0)
    assert embed_cosine(a, -a).item() == pytest.approx(2.0)


def test_affinity_is_the_mean_of_both_kl_directions():
    s, t, bank, tau = _unit(4, 16, seed=2), _unit(4, 16, seed=3), _unit(6, 16, seed=4), 0.1

    def kl(p_logits, q_logits):  # KL(softmax p ‖ softmax q), mean over rows
        p = torch.softmax(p_logits, -1)
        return (p * (torch.log_softmax(p_logits, -1) - torch.log_softmax(q_logits, -1))).sum(-1).mean()

    ls, lt = s @ bank.T / tau, t @ bank.T / tau
    expected = (kl(lt, ls) + kl(lt.T, ls.T)) / 2
    assert affinity_kl(s, t, bank, tau).item() == pytest.approx(expected.item(), rel=1e-5)
    assert affinity_kl(s, t, bank, tau).item() > 0


def test_pca_losses_are_zero_for_the_teachers_own_qkv_and_positive_otherwise():
    q, k, v = (torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    parts = pca_losses(q, k, v, q, k, v)
    assert parts["pca_attention"].item() == 0 and parts["pca_value"].item() == 0
    other = pca_losses(k, q, q, q, k, v)
    assert other["pca_attention"].item() > 0 and other["pca_value"].item() > 0


def test_attention_map_rows_are_distributions():
    a = attention_map(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    assert a.shape == (2, 3, 5, 5)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 5))


@pytest.mark.parametrize("cnn_grid", [(10, 10), (19, 19)])
def test_projectors_map_efficientnet_b3_grids_onto_vit_l14_tokens(cnn_grid):
    # EfficientNet-B3 at 300 px: 10x10 (stride 32) or 19x19 (stride 16); ViT-L/14: 16x16 patches.
    # Channels and width are scaled down; the grids are the real ones.
    fmap = torch.randn(2, 24, *cnn_grid)
    assert resample_map(fmap, (16, 16)).shape == (2, 24, 16, 16)
    pca = PCAProjector(24, width=32, heads=4)
    q, k, v = pca.project(fmap, (16, 16))
    assert q.shape == k.shape == v.shape == (2, 4, 256, 8)
    gl = GLProjector(24, width=32, grid=(16, 16), group=4)
    assert gl(fmap).shape == (2, 256, 32)
    assert gl.weight.shape == (16, 24, 32)  # one linear layer per 4x4 neighbourhood


def test_gl_projector_groups_share_one_linear_layer_and_handle_ragged_grids():
    gl = GLProjector(3, width=5, grid=(7, 7), group=4, dropout=0.0).eval()
    assert gl.weight.shape[0] == 4  # ceil(7/4)² groups; right and bottom ones are smaller
    x = torch.randn(1, 3, 7, 7)
    y = gl(x).reshape(7, 7, 5)
    # Position (5, 6) is in group (1, 1); its output is that group's linear map of its input.
    expected = x[0, :, 5, 6] @ gl.weight[3] + gl.bias[3]
    torch.testing.assert_close(y[5, 6], expected)
    expected0 = x[0, :, 0, 0] @ gl.weight[0] + gl.bias[0]
    torch.testing.assert_close(y[0, 0], expected0)


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
    rate = sum(rates) / len(rates)
    assert abs(rate - 0.5) < 0.03, rate
    s = pca.project(fmap, (4, 4))[0]
    mixed = pca.substitute(s, tq)
    from_teacher = (mixed == tq).float().mean().item()
    assert 0.35 < from_teacher < 0.65
    pca.eval()
    assert torch.equal(pca.substitute(s, tq), s)  # never at evaluation


def test_discriminator_losses_and_ramp():
    torch.manual_seed(0)
    d = Discriminator(8, 16)
    x = _unit(32, 8)
    torch.nn.init.zeros_(d.net[-1].weight)
    torch.nn.init.zeros_(d.net[-1].bias)
    # A discriminator that answers 0.5 for everything: exactly log 2 per BCE term.
    assert discriminator_loss(d, x, x).item() == pytest.approx(2 * math.log(2))
    assert adversarial_loss(d, x).item() == pytest.approx(math.log(2))
    d.net[-1].bias.data.fill_(5.0)  # says "teacher" for everything: the student's loss is small
    assert adversarial_loss(d, x).item() == pytest.approx(math.log1p(math.exp(-5.0)), rel=1e-5)
    assert [ramp(0.1, e, 2.0) for e in (0, 1, 2, 5)] == pytest.approx([0, 0.05, 0.1, 0.1])
    assert ramp(0.1, 0, 0) == 0.1


def test_warmup_cosine_schedule():
    from retrofit_agent.train.engine import WarmupCosine

    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half-way down the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
