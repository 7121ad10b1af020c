"""Teacher hooks, student feature maps, gradient checkpointing, augmentation."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from retrofit_agent.train.augment import Augmenter, step_generator  # noqa: E402
from retrofit_agent.train.config import AugmentConfig  # noqa: E402
from retrofit_agent.train.losses import embed_cosine  # noqa: E402
from retrofit_agent.train.projectors import GLProjector  # noqa: E402
from retrofit_agent.train.student import Student  # noqa: E402
from retrofit_agent.train.teacher import Teacher  # noqa: E402

pytestmark = [pytest.mark.train]


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return Teacher("retrofit-micro-clip", pretrained=None, seed=0)


def test_teacher_stays_frozen_in_eval_mode(teacher: Teacher):
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    assert not teacher.encode_image(x).requires_grad


def test_teacher_hooks_capture_the_tokens_that_make_the_embedding(teacher: Teacher):
    x = torch.randn(3, 3, 32, 32)
    f = teacher.forward_features(x, layer=-1)
    assert f.grid == (8, 8) and f.tokens.shape == (3, 1 + 64, teacher.width)
    assert f.q.shape == (3, teacher.num_heads, 65, teacher.width // teacher.num_heads)
    assert f.patch(f.tokens).shape == (3, 64, teacher.width)  # class token dropped
    assert f.patch(f.q).shape[-2] == 64
    # The last block's class token, through ln_post and the projection, is the embedding.
    v = teacher.model.visual
    emb = torch.nn.functional.normalize(v.ln_post(f.tokens[:, 0]) @ v.proj, dim=-1)
    torch.testing.assert_close(emb, f.embedding, atol=1e-5, rtol=1e-5)
    # Q, K, V recomputed from the captured ln_1 output reproduce the block's attention output.
    block = v.transformer.resblocks[-1]
    attn = torch.softmax(f.q @ f.k.transpose(-2, -1) / f.q.shape[-1] ** 0.5, -1) @ f.v
    mixed = block.attn.out_proj(attn.transpose(1, 2).reshape(3, 65, -1))
    prev = teacher.forward_features(x, layer=-2).tokens
    after_attn = prev + mixed
    torch.testing.assert_close(after_attn + block.mlp(block.ln_2(after_attn)), f.tokens, atol=1e-4, rtol=1e-4)
    assert not teacher.model.visual.transformer.resblocks[-1]._forward_hooks  # hooks are removed


def test_teacher_view_uses_clip_normalisation_and_stretch(teacher: Teacher):
    spec = teacher.input_spec()
    assert (spec.height, spec.width) == (32, 32) and spec.resize == "stretch"
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert teacher.encode_text(["a road", "rain"]).shape == (2, 64)


def test_student_feature_maps_and_l2_normalised_output():
    torch.manual_seed(0)
    s = Student("test_efficientnet", embed_dim=64, hidden_dim=32, input_size=64)
    emb, fmap = s.forward_with_features(torch.randn(2, 3, 64, 64), -2)
    assert emb.shape == (2, 64) and fmap.shape == (2, s.feature_channels(-2), 4, 4)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    s.eval()
    torch.testing.assert_close(s.forward_with_features(torch.ones(1, 3, 64, 64), -1)[0], s(torch.ones(1, 3, 64, 64)))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    s = Student("test_efficientnet", embed_dim=16, hidden_dim=32, input_size=64)
    gl = GLProjector(s.feature_channels(-2), 8, (4, 4), group=2, dropout=0.0)
    x, target = torch.randn(4, 3, 64, 64), torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        s.set_grad_checkpointing(checkpointing)
        s.zero_grad(set_to_none=True)
        emb, fmap = s.forward_with_features(x, -2)
        (embed_cosine(emb, target) + gl(fmap).pow(2).mean()).backward()
        return {n: p.grad.clone() for n, p in s.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert s.backbone.grad_checkpointing
    assert plain.keys() == ckpt.keys() and len(plain) > 50
    worst = max((plain[n] - ckpt[n]).abs().max().item() for n in plain)
    assert worst < 1e-6, worst


def test_augmentation_probabilities_and_determinism():
    x = torch.randn(64, 3, 32, 32)
    aug = Augmenter(AugmentConfig(), mean=(0.5,) * 3, std=(0.25,) * 3)
    a = aug(x, step_generator(0, 7, 0))
    torch.testing.assert_close(a, aug(x, step_generator(0, 7, 0)))  # same step → same views
    assert not torch.equal(a, aug(x, step_generator(0, 8, 0)))
    unchanged = sum(torch.equal(a[i], x[i]) for i in range(64))
    assert 0 < unchanged < 16  # (1 - 0.5)^4 = 1/16 of images untouched on average
    off = Augmenter(AugmentConfig(p_color=0, p_crop=0, p_rotate=0, p_mask=0), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(off(x, step_generator(0, 7, 0)), x)
    mask_only = Augmenter(AugmentConfig(p_color=0, p_crop=0, p_rotate=0, p_mask=1, mask_patch=0.25, mask_ratio=0.25),
                          mean=(0.5,) * 3, std=(0.25,) * 3)
    zeros = (mask_only(x + 10, step_generator(0, 1, 0)) == 0).float().mean().item()
    assert zeros == pytest.approx(0.25, abs=0.01)  # 4 of 16 patches set to the mean colour
