import pytest

from retrofit_agent.contract.regions import Region
from retrofit_agent.daemon.collect.campaigns import CampaignState, Decision, rule_matches
from retrofit_agent.daemon.config import CampaignConfig, CampaignRule, RegionRule


def rule(**kw) -> CampaignRule:
    return CampaignRule(**kw)


@pytest.mark.parametrize(
    "r, tags, expected",
    [
        (rule(any_of=["weather.rain", "weather.snow"]), {"weather.snow": 0.7}, True),
        (rule(any_of=["weather.rain"]), {"weather.fog": 0.9}, False),
        (rule(all_of=["weather.rain", "time_of_day.night"]), {"weather.rain": 0.7}, False),
        (rule(all_of=["weather.rain", "time_of_day.night"]), {"weather.rain": 0.7, "time_of_day.night": 0.6}, True),
        (rule(any_of=["weather.rain"], none_of=["scene.tunnel"]), {"weather.rain": 0.7, "scene.tunnel": 0.6}, False),
        (rule(any_of=["weather.rain"], none_of=["scene.tunnel"]), {"weather.rain": 0.7}, True),
        (rule(any_of=["weather.rain"], min_score=0.8), {"weather.rain": 0.7}, False),
        (rule(any_of=["weather.rain"], min_score=0.8), {"weather.rain": 0.85}, True),
    ],
)
def test_rule_evaluation(r, tags, expected):
    assert rule_matches(r, tags) is expected


def test_rule_needs_a_positive_condition():
    with pytest.raises(ValueError, match="needs any_of, all_of or region"):
        CampaignRule(none_of=["weather.rain"])


MIDDLE_THIRD = RegionRule(label="pedestrians.present", centre_x=(1 / 3, 2 / 3))
CENTRE = Region("pedestrians", "present", 0.9, (0.4, 0.3, 0.6, 0.7))  # centre (0.5, 0.5), area 0.08
EDGE = Region("pedestrians", "present", 0.9, (0.0, 0.3, 0.2, 0.7))  # centre (0.1, 0.5)
CYCLIST = Region("cyclists", "present", 0.9, (0.4, 0.3, 0.6, 0.7))


@pytest.mark.parametrize(
    "region, regions, expected",
    [
        (MIDDLE_THIRD, [CENTRE], True),
        (MIDDLE_THIRD, [EDGE], False),
        (MIDDLE_THIRD, [EDGE, CENTRE], True),  # any of the label's boxes
        (MIDDLE_THIRD, [CYCLIST], False),  # another label's box in the right place
        (MIDDLE_THIRD, [], False),
        (RegionRule(label="pedestrians.present", min_area=0.1), [CENTRE], False),
        (RegionRule(label="pedestrians.present", min_area=0.05), [EDGE], True),
        (RegionRule(label="pedestrians.present", centre_y=(0.6, 1.0)), [CENTRE], False),
    ],
)
def test_region_rules(region, regions, expected):
    tags = {"pedestrians.present": 0.9}
    assert rule_matches(rule(region=region), tags, regions) is expected
    assert rule_matches(rule(any_of=["pedestrians.present"], region=region), tags, regions) is expected


def test_a_region_rule_with_tag_conditions_needs_both():
    r = rule(none_of=["scene.tunnel"], region=MIDDLE_THIRD)
    assert rule_matches(r, {"pedestrians.present": 0.9}, [CENTRE])
    assert not rule_matches(r, {"pedestrians.present": 0.9, "scene.tunnel": 0.8}, [CENTRE])


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"label": "pedestrians"}, "should match pattern"),
        ({"label": "pedestrians.present", "centre_x": (0.7, 0.3)}, "0 <= low <= high <= 1"),
        ({"label": "pedestrians.present", "centre_y": (-0.1, 0.5)}, "0 <= low <= high <= 1"),
        ({"label": "pedestrians.present", "min_area": 1.5}, "less than or equal to 1"),
    ],
)
def test_bad_region_rules_are_refused(kw, needle):
    with pytest.raises(ValueError, match=needle):
        RegionRule(**kw)


def test_min_duration_must_hold_continuously():
    s = CampaignState(
        CampaignConfig(name="rain", rule=rule(any_of=["weather.rain"], min_duration_s=2.0), min_interval_s=0)
    )
    rain = {"weather.rain": 0.9}
    assert s.update(rain, 0.0) is Decision.WAITING
    assert s.update(rain, 1.5) is Decision.WAITING
    assert s.update({}, 1.8) is Decision.IDLE  # interrupted: the clock restarts
    assert s.update(rain, 2.0) is Decision.WAITING
    assert s.update(rain, 3.9) is Decision.WAITING
    assert s.update(rain, 4.0) is Decision.TRIGGER


def test_min_interval_and_hourly_cap():
    s = CampaignState(
        CampaignConfig(name="rain", rule=rule(any_of=["weather.rain"]), min_interval_s=10, max_per_hour=3)
    )
    rain = {"weather.rain": 0.9}
    decisions = [s.update(rain, t) for t in (0, 5, 10, 20, 30, 40, 3599, 3600, 3605, 3610)]
    assert decisions == [
        Decision.TRIGGER,
        Decision.RATE_LIMITED,
        Decision.TRIGGER,
        Decision.TRIGGER,
        Decision.RATE_LIMITED,
        Decision.RATE_LIMITED,
        Decision.RATE_LIMITED,  # 3 in the last hour
        Decision.TRIGGER,  # t=0 left the window
        Decision.RATE_LIMITED,  # interval
        Decision.TRIGGER,  # t=10 left the window, 10 s since the last
    ]
