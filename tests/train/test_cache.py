"""The teacher cache cannot lie: keyed first, checked on every build and read, views replayed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from retrofit_agent.contract.errors import ConfigError  # noqa: E402
from retrofit_agent.train import cache as cache_mod  # noqa: E402
from retrofit_agent.train.augment import Augmenter, Normalisation  # noqa: E402
from retrofit_agent.train.cache import CacheSpec, TeacherCache, build_cache, cache_key  # noqa: E402
from retrofit_agent.train.config import AugmentConfig  # noqa: E402
from retrofit_agent.train.data import DistillDataset, index_sources  # noqa: E402
from retrofit_agent.train.teacher import Teacher  # noqa: E402
from train_helpers import REPO, TINY, fresh_logging, images, tiny_config  # noqa: E402,F401  (fixtures)

pytestmark = [pytest.mark.train]


@pytest.fixture(scope="module")
def teachers() -> tuple[Teacher, Teacher]:
    return Teacher("retrofit-micro-clip", None, seed=0), Teacher("retrofit-micro-clip", None, seed=1)


def _refs(images: Path, n: int = 24):
    return index_sources([str(images)])[:n]


def _interrupt_after(monkeypatch, shards: int) -> None:
    real = cache_mod._build_shard
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        if calls["n"] == shards:
            raise KeyboardInterrupt  # the machine went away mid-build
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_build_shard", flaky)


def test_an_interrupted_build_rerun_with_another_teacher_is_refused_not_reused(tmp_path, images, teachers, monkeypatch):
    a, b = teachers
    refs, spec, root = _refs(images), CacheSpec(shard_size=10), tmp_path / "cache"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            build_cache(root, a, refs, spec, batch_size=8)
    assert json.loads((root / "key.json").read_text()) == cache_key(a, refs, spec)  # written before any shard
    assert (root / "shard-00000.json").exists() and not (root / "complete.json").exists()
    with pytest.raises(ConfigError) as e:
        build_cache(root, b, refs, spec, batch_size=8)
    msg = str(e.value)
    assert "\n" not in msg and "was built for" in msg and "weights_sha256" in msg and "cache.on_mismatch" in msg
    with pytest.raises(ConfigError, match="incomplete"):
        TeacherCache(root, cache_key(a, refs, spec), a.grid_size)
    # Rebuild on request: everything comes from the new teacher.
    build_cache(root, b, refs, spec, batch_size=8, on_mismatch="rebuild")
    c = TeacherCache(root, cache_key(b, refs, spec), b.grid_size)
    x = torch.stack([DistillDataset(refs, None, b.input_spec())[i]["teacher"] for i in (0, 15)])
    got = c.lookup(torch.tensor([0, 15]), torch.zeros(2, dtype=torch.long), torch.device("cpu"))
    torch.testing.assert_close(got.target, b.encode_image(x), atol=2e-3, rtol=0)
    with pytest.raises(ConfigError, match="was not built for"):
        TeacherCache(root, cache_key(a, refs, spec), a.grid_size)


def test_an_interrupted_build_with_the_same_key_resumes_at_the_missing_shards(tmp_path, images, teachers, monkeypatch):
    a, _ = teachers
    refs, spec, root = _refs(images), CacheSpec(shard_size=10), tmp_path / "cache"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            build_cache(root, a, refs, spec, batch_size=8)
    built = []
    real = cache_mod._build_shard
    monkeypatch.setattr(cache_mod, "_build_shard", lambda root, i, *rest: (built.append(i), real(root, i, *rest)))
    stats = build_cache(root, a, refs, spec, batch_size=8)
    assert built == [2] and stats["built_images"] == 4
    TeacherCache(root, cache_key(a, refs, spec), a.grid_size)


def test_resolution_view_set_and_image_list_are_part_of_the_key(tmp_path, images, teachers):
    a, _ = teachers
    refs, root = _refs(images), tmp_path / "cache"
    build_cache(root, a, refs, CacheSpec(shard_size=10), batch_size=8)
    key = cache_key(a, refs, CacheSpec(shard_size=10))
    other_size = {**key, "input": {**key["input"], "height": 48, "width": 48}}
    for changed, what in (
        (CacheSpec(shard_size=10, views=2, teacher_view="same"), "views"),
        (CacheSpec(shard_size=10, layers=(-1,)), "spatial"),
        (CacheSpec(shard_size=5), "shard_size"),
    ):
        with pytest.raises(ConfigError, match=what):
            build_cache(root, a, refs, changed, batch_size=8)
    with pytest.raises(ConfigError, match="images"):
        build_cache(root, a, refs[:-1], CacheSpec(shard_size=10), batch_size=8)
    with pytest.raises(ConfigError, match="not built for"):
        TeacherCache(root, other_size, a.grid_size)
    assert "48 px" in cache_mod._describe(other_size)


def test_a_directory_without_a_key_is_refused_or_rebuilt(tmp_path, images, teachers):
    a, _ = teachers
    root = tmp_path / "old"
    root.mkdir()
    import numpy as np

    np.save(root / "emb-00000.npy", np.zeros((3, 64), dtype=np.float16))  # what the earlier format wrote, no key
    (root / "notes.txt").write_text("not ours")
    with pytest.raises(ConfigError, match="without a key"):
        build_cache(root, a, _refs(images, 6), CacheSpec(), batch_size=8)
    build_cache(root, a, _refs(images, 6), CacheSpec(), batch_size=8, on_mismatch="rebuild")
    assert (root / "notes.txt").exists() and (root / "complete.json").exists()  # only its own files are deleted


def test_stored_views_are_what_the_teacher_saw_and_steps_replay_them(tmp_path, images, teachers):
    a, _ = teachers
    refs, root = _refs(images, 12), tmp_path / "cache"
    aug_cfg = AugmentConfig(p_color=1.0, p_crop=1.0, p_rotate=0.5)
    spec = CacheSpec(views=3, seed=7, teacher_view="same", augment=aug_cfg, layers=(-1, -2), qkv=True, shard_size=5)
    build_cache(root, a, refs, spec, batch_size=4)
    c = TeacherCache(root, cache_key(a, refs, spec), a.grid_size)
    index, view = torch.tensor([0, 6, 11, 6]), torch.tensor([2, 0, 1, 1])
    got = c.lookup(index, view, torch.device("cpu"))
    assert got.ok.all() and len(got.target.layers) == 2
    # Image 6, view 1 was stored as shard 1, row 1: the shard's views are a pure function of (seed, shard).
    norm = Normalisation(a.mean, a.std)
    expected_params = cache_mod.shard_views(spec, 1, 5, norm)
    assert torch.equal(got.views.pack()[3], expected_params.pack()[1 * 3 + 1])
    # The teacher's outputs on that view, recomputed live, match the stored ones (float16 storage).
    x = torch.stack([DistillDataset(refs, None, a.input_spec())[i]["teacher"] for i in index.tolist()])
    live = a.forward_features(Augmenter(aug_cfg, a.mean, a.std).apply(x, got.views, norm), [-1, -2])
    torch.testing.assert_close(got.target.embedding, live.embedding, atol=2e-3, rtol=0)
    for stored, fresh in zip(got.target.layers, live.layers):
        for name in ("tokens", "q", "k", "v"):
            s, f = getattr(stored, name), live.patch(getattr(fresh, name))
            assert s.shape == f.shape
            torch.testing.assert_close(s, f, atol=2e-2 * f.abs().max().item(), rtol=1e-2)
    assert not torch.equal(got.views.pack()[1], got.views.pack()[3])  # image 6: two different stored views


def test_training_from_a_view_cache_replays_the_stored_view_on_the_students_input(tmp_path, images):
    from retrofit_agent.train.engine import Distiller

    cfg = tiny_config(
        tmp_path / "run",
        [str(images)],
        data={"max_images": 48, "holdout": 0, "batch_size": 8},
        cache={"enabled": True, "views": 3, "spatial": True, "shard_size": 20},
        augment={"p_mask": 0.0, "views": 2},
    )
    d = Distiller(cfg)
    batch = next(iter(d.data.loader))
    assert "teacher" not in batch  # the live teacher view is not even decoded
    v = d.views(batch, step=3)
    assert v.student.shape[0] == 16 and len(v.target.layers) == 1
    # Rebuild the draw: the same stored view ids, their params applied to the clean student view.
    gen = __import__("retrofit_agent.train.augment", fromlist=["step_generator"]).step_generator(cfg.run.seed, 3, 0)
    stored = torch.randint(3, (16,), generator=gen)
    c = d.cache.lookup(batch["index"].repeat(2), stored, torch.device("cpu"))
    aug = Augmenter(cfg.augment, d.student.mean, d.student.std)
    expected = aug.apply(batch["student"].repeat(2, 1, 1, 1), c.views, aug.norm)
    torch.testing.assert_close(v.student, expected)
    torch.testing.assert_close(v.target.embedding, c.target.embedding)
    metrics = d.train_step(batch)
    assert {"loss_embed", "loss_gl", "loss_pca_attention"} <= metrics.keys()


def test_cli_refuses_a_cache_built_for_another_teacher_with_one_line_and_exit_2(
    tmp_path, images, capsys, fresh_logging
):
    from retrofit_agent.train.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(images.iterdir())[:40]:
        (data / p.name).symlink_to(p)
    args = [
        "distill",
        "--config",
        str(TINY),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--max-steps",
        "1",
        "--set",
        f'data.train=["{data}"]',
        "--set",
        "data.holdout=8",
        "--set",
        "data.batch_size=8",
        "--set",
        "cache.enabled=true",
        "--set",
        "loss.pca_attention=0",
        "--set",
        "loss.pca_value=0",
        "--set",
        "loss.gl=0",
        "--set",
        f"bank.prompts_file={REPO / 'models' / 'prompts' / 'automotive.toml'}",
    ]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--set", "teacher.seed=1"]) == 2
    err = capsys.readouterr().err  # start-up log lines, then the one error line
    last = err.strip().splitlines()[-1]
    assert err.count("error:") == 1 and "Traceback" not in err
    assert last.startswith("retrofit-model: error: teacher cache") and "was built for" in last


def test_dense_targets_are_stored_per_view_and_replay_aligned_with_the_view(tmp_path, images, teachers):
    """The per-patch embeddings are the teacher's on the stored view (crop, rotation): the student's
    input gets the same view, so cell (i, j) of both describes the same place."""
    a, _ = teachers
    refs, root = _refs(images, 10), tmp_path / "cache"
    aug_cfg = AugmentConfig(p_color=0.5, p_crop=1.0, p_rotate=1.0)
    spec = CacheSpec(views=2, seed=3, teacher_view="same", augment=aug_cfg, shard_size=6, dense=True)
    build_cache(root, a, refs, spec, batch_size=4)
    key = cache_key(a, refs, spec)
    assert key["format"] == 3 and key["dense"] == {"grid": [8, 8], "dim": a.embed_dim}
    c = TeacherCache(root, key, (0, 0))
    index, view = torch.tensor([1, 7, 7]), torch.tensor([0, 0, 1])
    got = c.lookup(index, view, torch.device("cpu"))
    assert got.target.layers == () and got.target.dense.shape == (3, 8, 8, a.embed_dim)
    norm = Normalisation(a.mean, a.std)
    x = torch.stack([DistillDataset(refs, None, a.input_spec())[i]["teacher"] for i in index.tolist()])
    live = a.encode_dense(Augmenter(aug_cfg, a.mean, a.std).apply(x, got.views, norm))
    torch.testing.assert_close(got.target.dense, live, atol=3e-3, rtol=0)  # float16 storage
    unaligned = a.encode_dense(x)  # the clean picture: not the view the student will see
    assert (got.target.dense - unaligned).abs().max() > 20 * (got.target.dense - live).abs().max()
    # A cache without the dense targets is another key: refused (or rebuilt), never read as if it had them.
    plain = tmp_path / "plain"
    build_cache(plain, a, refs, CacheSpec(**{**spec.__dict__, "dense": False}), batch_size=4)
    with pytest.raises(ConfigError, match="differs in: dense"):
        build_cache(plain, a, refs, spec, batch_size=4)
    with pytest.raises(ConfigError, match="not built for"):
        TeacherCache(plain, key, (0, 0))


def test_a_cache_from_the_earlier_format_is_refused_not_misread(tmp_path, images, teachers):
    a, _ = teachers
    refs, root = _refs(images, 6), tmp_path / "cache"
    build_cache(root, a, refs, CacheSpec(), batch_size=8)
    old = json.loads((root / "key.json").read_text())
    old["format"] = 2
    del old["dense"]
    (root / "key.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"differs in: format\)"):
        build_cache(root, a, refs, CacheSpec(), batch_size=8)
