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


@pytest.fixture
def teacher() -> Teacher:
    # Function-scoped: cheap for the micro CLIP, and every test then sees a freshly built teacher.
    return Teacher("retrofit-micro-clip", pretrained=None, seed=0)


def test_teacher_stays_frozen_in_eval_mode(teacher: Teacher):
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    assert not teacher.encode_image(x).requires_grad


def test_teacher_hooks_capture_the_tokens_that_make_the_embedding(teacher: Teacher):
    x = torch.randn(3, 3, 32, 32)
    f = teacher.forward_features(x, layers=-1)
    assert f.grid == (8, 8) and f.tokens.shape == (3, 1 + 64, teacher.width) and len(f.layers) == 1
    assert f.q.shape == (3, teacher.num_heads, 65, teacher.width // teacher.num_heads)
    assert f.patch(f.tokens).shape == (3, 64, teacher.width)  # class token dropped
    assert f.patch(f.patch(f.tokens)).shape == (3, 64, teacher.width)  # idempotent (cached tokens have none)
    assert f.patch(f.q).shape[-2] == 64
    # The last block's class token, through ln_post and the projection, is the embedding.
    v = teacher.model.visual
    emb = torch.nn.functional.normalize(v.ln_post(f.tokens[:, 0]) @ v.proj, dim=-1)
    torch.testing.assert_close(emb, f.embedding, atol=1e-5, rtol=1e-5)
    # Q, K, V recomputed from the captured ln_1 output reproduce the block's attention output.
    block = v.transformer.resblocks[-1]
    attn = torch.softmax(f.q @ f.k.transpose(-2, -1) / f.q.shape[-1] ** 0.5, -1) @ f.v
    mixed = block.attn.out_proj(attn.transpose(1, 2).reshape(3, 65, -1))
    both = teacher.forward_features(x, layers=[-1, -2])  # several blocks from one pass
    assert torch.equal(both.layers[0].tokens, f.tokens)
    after_attn = both.layers[1].tokens + mixed
    torch.testing.assert_close(after_attn + block.mlp(block.ln_2(after_attn)), f.tokens, atol=1e-4, rtol=1e-4)
    assert not block._forward_hooks and not block.ln_1._forward_hooks  # hooks are removed
    tokens_only = teacher.forward_features(x, layers=[-2], qkv=False)
    assert tokens_only.q is None and torch.equal(tokens_only.tokens, both.layers[1].tokens)


def test_teacher_refuses_blocks_whose_qk_the_hooks_cannot_reproduce(teacher: Teacher):
    from open_clip.transformer import CustomResidualAttentionBlock

    from retrofit_agent.contract.errors import ConfigError

    teacher.check_spatial([-1, -2], need_qk=True)
    with pytest.raises(ConfigError, match="outside the teacher's 2 blocks"):
        teacher.check_spatial([-3], need_qk=False)
    with pytest.raises(ConfigError, match="outside"):
        teacher.check_spatial([2], need_qk=False)
    blocks = teacher.model.visual.transformer.resblocks
    original = blocks[-1]
    try:
        for kwargs, why in (
            ({"qk_norm": True}, "uses QK-norm"),
            ({"scale_cosine_attn": True}, "scaled cosine attention"),
        ):
            blocks[-1] = CustomResidualAttentionBlock(teacher.width, teacher.num_heads, **kwargs)
            with pytest.raises(ConfigError, match=why) as e:
                teacher.check_spatial([-1], need_qk=True)
            assert "\n" not in str(e.value) and "loss.pca_attention" in str(e.value)
            teacher.check_spatial([-1], need_qk=False)  # tokens alone (GL) are still what the block outputs
        blocks[-1] = CustomResidualAttentionBlock(teacher.width, teacher.num_heads)  # plain: reproducible
        teacher.check_spatial([-1], need_qk=True)
    finally:
        blocks[-1] = original


def test_open_clip_older_than_the_floor_is_refused_with_one_line(monkeypatch):
    import open_clip

    from retrofit_agent.contract.errors import ConfigError
    from retrofit_agent.train.teacher import check_open_clip

    check_open_clip("2.26.1")
    check_open_clip("3.3.0")
    for old in ("2.24.0", "2.25.9", "1.9", "unknown"):
        with pytest.raises(ConfigError, match="older than 2.26") as e:
            check_open_clip(old)
        assert "\n" not in str(e.value) and "pip install 'open_clip_torch>=2.26'" in str(e.value)
    monkeypatch.setattr(open_clip, "__version__", "2.24.0")
    with pytest.raises(ConfigError, match="open_clip_torch 2.24.0"):
        Teacher("retrofit-micro-clip", pretrained=None, seed=0)


def test_weights_hash_covers_every_weight_and_the_fingerprint_only_the_projections():
    a, b = (
        Teacher("retrofit-micro-clip", pretrained=None, seed=0),
        Teacher("retrofit-micro-clip", pretrained=None, seed=0),
    )
    assert a.weights_sha256() == b.weights_sha256() and len(a.weights_sha256()) == 64
    with torch.no_grad():
        b.model.visual.transformer.resblocks[0].mlp.c_fc.weight[0, 0] += 1e-3
    b._weights_sha256 = None
    assert a.weights_sha256() != b.weights_sha256()
    assert a.fingerprint() == b.fingerprint()  # same embedding space as far as the bank can tell


def test_teacher_view_uses_clip_normalisation_and_stretch(teacher: Teacher):
    from retrofit_agent.contract.bundle import InputSpec

    spec = teacher.input_spec()
    assert (spec.height, spec.width) == (32, 32) and spec.resize == "stretch"
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert spec == InputSpec(
        name="teacher",
        height=32,
        width=32,
        layout="NCHW",
        dtype="float32",
        color="RGB",
        mean=teacher.mean,
        std=teacher.std,
        resize="stretch",
        interpolation="area",
    )
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
    mask_only = Augmenter(
        AugmentConfig(p_color=0, p_crop=0, p_rotate=0, p_mask=1, mask_patch=0.25, mask_ratio=0.25),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    zeros = (mask_only(x + 10, step_generator(0, 1, 0)) == 0).float().mean().item()
    assert zeros == pytest.approx(0.25, abs=0.01)  # 4 of 16 patches set to the mean colour


def _norm(x: torch.Tensor, n) -> torch.Tensor:
    mean, std = n.tensors(x)
    return (x - mean) / std


def _rgb(x: torch.Tensor, n) -> torch.Tensor:
    mean, std = n.tensors(x)
    return x * std + mean


def test_one_view_renders_the_same_picture_in_either_models_normalisation_and_size():
    from retrofit_agent.train.augment import Normalisation

    g = torch.Generator().manual_seed(0)
    rgb = torch.nn.functional.interpolate(
        torch.rand(8, 3, 8, 8, generator=g), size=(64, 64), mode="bilinear"
    )  # smooth scenes
    imagenet, clip = (
        Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        Normalisation((0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
    )
    aug = Augmenter(AugmentConfig(p_color=1, p_crop=1, p_rotate=0, p_mask=0), imagenet.mean, imagenet.std)
    params = aug.sample(8, step_generator(0, 3, 0))
    assert params.color_on.all() and params.geometry_on.all()
    # Same size, two normalisations: the same RGB picture (crop and colour are linear in RGB).
    a = _rgb(aug.apply(_norm(rgb, imagenet), params, imagenet), imagenet)
    b = _rgb(aug.apply(_norm(rgb, clip), params, clip), clip)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Two sizes (the student's 64 px, the teacher's 32 px): the same picture up to resampling.
    small = torch.nn.functional.interpolate(rgb, size=(32, 32), mode="area")
    c = _rgb(aug.apply(_norm(small, clip), params, clip), clip)
    shrunk = torch.nn.functional.interpolate(a, size=(32, 32), mode="area")
    other = _rgb(aug.apply(_norm(small, clip), aug.sample(8, step_generator(0, 4, 0)), clip), clip)
    same_err, other_err = (shrunk - c).abs().mean().item(), (shrunk - other).abs().mean().item()
    assert same_err < 0.02 < other_err, (same_err, other_err)


def test_view_params_round_trip_and_identity_leaves_images_untouched():
    from retrofit_agent.train.augment import PARAMS, Normalisation, ViewParams

    aug = Augmenter(AugmentConfig(), mean=(0.5,) * 3, std=(0.25,) * 3)
    p = aug.sample(16, step_generator(1, 2, 3))
    packed = p.pack()
    assert packed.shape == (16, PARAMS)
    q = ViewParams.unpack(packed)
    for name in ("color_on", "color", "geometry_on", "theta"):
        assert torch.equal(getattr(p, name), getattr(q, name))
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(aug.apply(x, ViewParams.identity(4), Normalisation((0.5,) * 3, (0.25,) * 3)), x)
    off = Augmenter(AugmentConfig(enabled=False), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert (
        not off.sample(4, step_generator(0, 0, 0)).geometry_on.any()
        and off.sample_mask(4, step_generator(0, 0, 0)) is None
    )


def test_masking_is_drawn_in_cells_of_the_image_side():
    aug = Augmenter(
        AugmentConfig(p_color=0, p_crop=0, p_rotate=0, p_mask=1, mask_patch=0.25, mask_ratio=0.5),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    keep = aug.sample_mask(10, step_generator(0, 0, 0))
    assert keep.shape == (10, 4, 4) and (keep.flatten(1).sum(1) == 8).all()  # half of 16 cells kept
    x = aug.apply(torch.ones(10, 3, 20, 20), aug.sample(10, step_generator(0, 0, 0)), aug.norm, keep)
    assert ((x == 0).flatten(1).float().mean(1) == 0.5).all()  # at 20 px each cell is 5x5


# --------------------------------------------------------------------------- edges the mutation run found


def test_teacher_takes_size_mean_and_std_from_open_clips_preprocessing(monkeypatch):
    import open_clip

    real = open_clip.create_model
    cfg = {"size": (48, 64), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}

    def create(*args, **kwargs):
        model = real(*args, **kwargs)
        model.visual.preprocess_cfg = dict(cfg)
        return model

    monkeypatch.setattr(open_clip, "create_model", create)
    t = Teacher("retrofit-micro-clip", pretrained=None, seed=0)
    assert (t.image_size, t.mean, t.std) == (48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))  # a (h, w) size: its first side
    cfg["size"] = 40
    assert Teacher("retrofit-micro-clip", pretrained=None, seed=0).image_size == 40


def test_teacher_loads_a_local_checkpoint_and_names_it_by_file(tmp_path):
    source = Teacher("retrofit-micro-clip", pretrained=None, seed=3)
    path = tmp_path / "micro.pt"
    torch.save(source.model.state_dict(), path)
    t = Teacher("retrofit-micro-clip", pretrained=str(path), seed=0)
    assert t.identity == "retrofit-micro-clip/micro.pt" and t.pretrained == str(path)
    assert t.weights_sha256() == source.weights_sha256()
    assert Teacher("retrofit-micro-clip", pretrained=None, seed=0).identity == "retrofit-micro-clip/seeded-untrained"


def test_fingerprint_covers_both_projections_and_the_logit_scale(teacher: Teacher):
    base = teacher.fingerprint()
    assert len(base) == 16
    for name in ("text_projection", "visual.proj", "logit_scale"):
        t = Teacher("retrofit-micro-clip", pretrained=None, seed=0)
        with torch.no_grad():
            t.model.get_parameter(name).add_(0.01)
        assert t.fingerprint() != base, name
    bf16 = Teacher("retrofit-micro-clip", pretrained=None, seed=0)
    bf16.model.to(torch.bfloat16)
    assert len(bf16.fingerprint()) == 16 and len(bf16.weights_sha256()) == 64  # any dtype hashes


class _Bare(torch.nn.Module):
    pass


def _stub_teacher(teacher: Teacher, **parts) -> Teacher:
    """``teacher`` with its open_clip model replaced by a stub holding ``parts`` (None: absent)."""
    model, visual, transformer = _Bare(), _Bare(), _Bare()
    if parts.get("blocks") is not None:
        transformer.resblocks = parts["blocks"]
    if parts.get("batch_first", True) is not None:
        transformer.batch_first = parts.get("batch_first", True)
    if parts.get("transformer", True):
        visual.transformer = transformer
    if parts.get("visual", True):
        model.visual = visual
    teacher.model = model
    return teacher


def _block(attn: bool = True, ln_1: bool = True) -> torch.nn.Module:
    b = _Bare()
    if attn:
        b.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    if ln_1:
        b.ln_1 = torch.nn.LayerNorm(8)
    return b


def test_teachers_without_open_clip_attention_blocks_are_refused_with_one_line(teacher: Teacher):
    from retrofit_agent.contract.errors import ConfigError

    not_vit = (
        r"^teacher 'retrofit-micro-clip' is not a ViT with open_clip attention blocks; the PCA/GL losses need one "
        r"\(set loss.pca_attention, loss.pca_value and loss.gl to 0 to use the embedding and affinity losses only\)$"
    )
    for parts in (
        {"visual": False},
        {"transformer": False},
        {"blocks": None},
        {"blocks": torch.nn.ModuleList([_block(ln_1=False)])},
        {"blocks": torch.nn.ModuleList([_block(attn=False)])},
    ):
        with pytest.raises(ConfigError, match=not_vit):
            _stub_teacher(teacher, **parts).check_spatial([-1], need_qk=False)
    with pytest.raises(
        ConfigError,
        match=r"^teacher 'retrofit-micro-clip': its transformer does not say whether it runs "
        r"batch-first; upgrade open_clip_torch$",
    ):
        _stub_teacher(teacher, blocks=torch.nn.ModuleList([_block()]), batch_first=None).check_spatial(
            [-1], need_qk=False
        )
    one = _stub_teacher(teacher, blocks=torch.nn.ModuleList([_block()]))  # a one-block ViT is fine
    one.check_spatial([0], need_qk=True)
    assert one.num_heads == 2


def test_every_listed_block_is_checked(teacher: Teacher):
    from retrofit_agent.contract.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^teacher.layer: 5 is outside the teacher's 2 blocks$"):
        teacher.check_spatial([-1, 5], need_qk=False)
    with pytest.raises(ConfigError, match="-3 is outside"):
        teacher.check_spatial([0, -3], need_qk=True)


def test_attention_without_a_packed_in_projection_or_with_k_norm_only_is_refused(teacher: Teacher):
    from open_clip.transformer import Attention

    from retrofit_agent.contract.errors import ConfigError

    def refused(attn: torch.nn.Module, why: str) -> None:
        block = _block()
        block.attn = attn
        t = _stub_teacher(Teacher("retrofit-micro-clip", pretrained=None, seed=0), blocks=torch.nn.ModuleList([block]))
        with pytest.raises(
            ConfigError,
            match=rf"^teacher 'retrofit-micro-clip' block -1 {why}: the hooks cannot reproduce "
            r"its Q/K; use another teacher or set loss.pca_attention and loss.pca_value to 0$",
        ):
            t.check_spatial([-1], need_qk=True)

    separate = torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)  # separate Q/K/V weights
    assert separate.in_proj_weight is None
    refused(separate, r"has no packed in-projection \(separate Q/K/V weights\)")
    timm_like = _Bare()  # no in_proj_weight attribute at all (e.g. a qkv Linear)
    timm_like.qkv = torch.nn.Linear(8, 24)
    refused(timm_like, r"has no packed in-projection \(separate Q/K/V weights\)")
    k_only = Attention(8, 2)
    k_only.ln_k = torch.nn.LayerNorm(4)
    refused(k_only, "uses QK-norm")
    refused(Attention(8, 2, qk_norm=True), "uses QK-norm")
    refused(Attention(8, 2, scaled_cosine=True), "uses scaled cosine attention")


def test_patch_drops_the_class_token_on_non_square_grids():
    from retrofit_agent.train.teacher import LayerFeatures, TeacherFeatures

    tokens = torch.arange(7.0).view(1, 7, 1)
    f = TeacherFeatures(embedding=torch.zeros(1, 2), layers=(LayerFeatures(tokens=tokens),), grid=(2, 3))
    assert f.patch(tokens).flatten().tolist() == [1, 2, 3, 4, 5, 6]


def test_open_clip_without_a_version_is_refused(monkeypatch):
    import open_clip

    from retrofit_agent.contract.errors import ConfigError
    from retrofit_agent.train.teacher import check_open_clip

    monkeypatch.delattr(open_clip, "__version__")
    with pytest.raises(ConfigError, match=r"^open_clip_torch 0 is older than 2.26 "):
        check_open_clip()
