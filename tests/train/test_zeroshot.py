"""The camera's zero-shot definition (contract, numpy) and its torch twin (train) agree."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retrofit_agent.contract import zeroshot as np_zs

torch = pytest.importorskip("torch")

from retrofit_agent.train import zeroshot as torch_zs  # noqa: E402

pytestmark = [pytest.mark.train]


def test_group_softmax_by_hand():
    groups = np_zs.group_index(["a", "a", "b", "b", "b"])
    assert [g.tolist() for g in groups] == [[0, 1], [2, 3, 4]]
    p = np_zs.group_softmax(np.array([0.0, math.log(3), 0.0, 0.0, 0.0]), groups)
    np.testing.assert_allclose(p, [0.25, 0.75, 1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    flat = np_zs.group_softmax(np.array([0.0, math.log(3), 0.0, 0.0, 0.0]), np_zs.group_index(["x"] * 5))
    np.testing.assert_allclose(flat, [1 / 7, 3 / 7, 1 / 7, 1 / 7, 1 / 7], rtol=1e-6)


def test_groups_need_not_be_contiguous_and_large_logits_do_not_overflow():
    groups = np_zs.group_index(["a", "b", "a"])
    assert [g.tolist() for g in groups] == [[0, 2], [1]]
    p = np_zs.group_softmax(np.array([[1000.0, 5.0, 1000.0 + math.log(3)]]), groups)
    np.testing.assert_allclose(p, [[0.25, 1.0, 0.75]], rtol=1e-4)  # float32 spacing at 1000 is 6e-5
    assert np.isfinite(p).all()
    np.testing.assert_array_equal(
        np_zs.group_argmax(np.array([[0.1, 9.0, 0.3], [0.5, -1.0, 0.2]]), groups), [[2, 1], [0, 1]]
    )


def test_logits_are_the_logit_scale_times_the_cosine():
    bank = np.eye(3, dtype=np.float32)
    e = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    np.testing.assert_allclose(np_zs.zero_shot_logits(e, bank, 100.0), [60.0, 80.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np_zs.zero_shot_logits(e[None], bank, 2.0), [[1.2, 1.6, 0.0]], rtol=1e-6)


def test_the_torch_twin_equals_the_cameras_definition():
    rng = np.random.default_rng(0)
    names = [rng.choice(["weather", "road", "light", "time"]) for _ in range(17)]
    bank = rng.standard_normal((17, 32)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    emb = rng.standard_normal((9, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    zb = torch_zs.ZeroShotBank.build(torch.from_numpy(bank), names, [f"l{i}" for i in range(17)])
    assert zb.keys[0] == f"{names[0]}.l0"
    groups = np_zs.group_index(names)
    assert [g.tolist() for g in zb.groups] == [g.tolist() for g in groups]
    want_logits = np_zs.zero_shot_logits(emb, bank, 100.0)
    got_logits = zb.logits(torch.from_numpy(emb), 100.0)
    np.testing.assert_allclose(got_logits.numpy(), want_logits, rtol=1e-5, atol=1e-4)
    want = np_zs.group_softmax(want_logits, groups)
    got = torch_zs.group_log_softmax(got_logits, zb.groups).exp().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(
        torch_zs.group_argmax(got_logits, zb.groups).numpy(), np_zs.group_argmax(want_logits, groups)
    )
    # Under autocast the twin still computes in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = zb.logits(torch.from_numpy(emb), 100.0)
    assert under.dtype == torch.float32
    np.testing.assert_allclose(under.numpy(), want_logits, rtol=1e-5, atol=1e-4)


def test_the_daemons_labeller_uses_the_shared_definition():
    from retrofit_agent.contract.bundle import BankSpec, GroupSpec, LabelSpec, TextBank
    from retrofit_agent.daemon.config import LabelsConfig
    from retrofit_agent.daemon.labelling import ZeroShotLabeler

    emb = np.eye(4, dtype=np.float32)
    bank = TextBank(emb, ("a", "a", "b", "b"), ("x", "y", "z", "w"), "t", "f")
    spec = BankSpec(
        file="bank.npz",
        logit_scale=math.log(3) / 0.6,
        groups=[
            GroupSpec(name="a", labels=[LabelSpec(name="x"), LabelSpec(name="y")]),
            GroupSpec(name="b", labels=[LabelSpec(name="z"), LabelSpec(name="w")]),
        ],
    )
    p = ZeroShotLabeler(bank, spec, LabelsConfig()).probabilities(np.array([0.0, 0.6, 0.8, 0.0], dtype=np.float32))
    # Group a: logits (0, ln 3) → (1/4, 3/4); group b: (ln 3 · 4/3, 0).
    np.testing.assert_allclose(p[:2], [0.25, 0.75], rtol=1e-5)
    np.testing.assert_allclose(
        p,
        np_zs.group_softmax(
            np_zs.zero_shot_logits(np.array([0, 0.6, 0.8, 0]), emb, spec.logit_scale), np_zs.group_index(bank.groups)
        ),
        rtol=1e-6,
    )


def test_flat_bank_is_one_group_of_every_row():
    zb = torch_zs.ZeroShotBank.build(torch.eye(3), ["a", "b", "b"], ["x", "y", "z"])
    assert len(zb.groups) == 2 and len(zb.flat().groups) == 1
    assert zb.flat().groups[0].tolist() == [0, 1, 2]
    assert zb.to(torch.device("cpu")).keys == ("a.x", "b.y", "b.z")
