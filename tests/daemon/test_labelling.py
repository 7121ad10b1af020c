import numpy as np
import pytest

from retrofit_agent.contract.bundle import BankSpec, GroupSpec, LabelSpec, TextBank
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.config import LabelsConfig
from retrofit_agent.daemon.labelling import ZeroShotLabeler


def make(cfg: LabelsConfig | None = None, logit_scale: float = 10.0):
    # 5 orthonormal label vectors in 5-D: similarity to a basis vector is 1 or 0.
    emb = np.eye(5, dtype=np.float32)
    bank = TextBank(emb, ("weather",) * 3 + ("ped",) * 2, ("clear", "rain", "fog", "present", "absent"), "t", "f" * 16)
    spec = BankSpec(
        file="bank.npz",
        logit_scale=logit_scale,
        groups=[
            GroupSpec(
                name="weather",
                labels=[LabelSpec(name="clear"), LabelSpec(name="rain"), LabelSpec(name="fog", threshold=0.9)],
            ),
            GroupSpec(
                name="ped", labels=[LabelSpec(name="present", threshold=0.6), LabelSpec(name="absent", negative=True)]
            ),
        ],
    )
    return ZeroShotLabeler(bank, spec, cfg or LabelsConfig())


def unit(*weights):
    v = np.asarray(weights, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_softmax_within_groups_known_answer():
    lab = make(logit_scale=10.0)
    p = lab.probabilities(np.array([1, 0, 0, 0, 0], np.float32))
    e = np.exp(10.0)
    np.testing.assert_allclose(p[:3], [e / (e + 2), 1 / (e + 2), 1 / (e + 2)], rtol=1e-5)
    np.testing.assert_allclose(p[3:], [0.5, 0.5], rtol=1e-5)


def test_tags_tops_and_negative_labels():
    lab = make()
    r = lab(np.array([1, 0, 0, 0, 1], np.float32) / np.sqrt(2))
    assert [t.key for t in r.tags] == ["weather.clear"]  # ped.absent wins its group but is background
    assert [t.key for t in r.tops] == ["weather.clear", "ped.absent"]
    assert [(c.tag.key, c.on) for c in r.changes] == [("weather.clear", True)]


def test_per_label_threshold_and_config_override():
    v = unit(0, 0, 1, 0, 0)  # fog ≈ 0.99996 with scale 10
    assert [t.key for t in make(logit_scale=1.0)(v).tags] == []  # fog p ≈ 0.58 < 0.9
    cfg = LabelsConfig(thresholds={"weather.fog": 0.5})
    assert [t.key for t in make(cfg, logit_scale=1.0)(v).tags] == ["weather.fog"]


def test_unknown_threshold_override_is_a_config_error():
    with pytest.raises(ConfigError, match="weather.hail"):
        make(LabelsConfig(thresholds={"weather.hail": 0.5}))


def test_off_event_when_tag_drops():
    lab = make()
    lab(unit(1, 0, 0, 0, 0))
    r = lab(unit(0, 1, 0, 0, 0))
    assert {(c.tag.key, c.on) for c in r.changes} == {("weather.clear", False), ("weather.rain", True)}


def test_ema_smoothing_delays_a_flicker():
    lab = make(LabelsConfig(smoothing_alpha=0.3))
    for _ in range(5):
        lab(unit(1, 0, 0, 0, 0))
    r = lab(unit(0, 1, 0, 0, 0))  # one odd frame
    assert [t.key for t in r.tags] == ["weather.clear"]
    assert r.changes == []


def test_hysteresis_keeps_a_tag_on_just_below_threshold():
    lab = make(LabelsConfig(hysteresis=0.2), logit_scale=3.0)
    assert [t.key for t in lab(unit(1, 0, 0, 0, 0)).tags] == ["weather.clear"]  # p ≈ 0.91
    v = unit(1, 0.9, 0.9, 0, 0)  # clear drops to ≈ 0.38: below 0.5 but above 0.5 - 0.2
    assert [t.key for t in lab(v).tags] == ["weather.clear"]
    lab.reset()
    assert lab(v).tags == []
