import pytest

from retrofit_agent.daemon.collect.campaigns import CampaignState, Decision, rule_matches
from retrofit_agent.daemon.config import CampaignConfig, CampaignRule


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
    with pytest.raises(ValueError, match="needs any_of or all_of"):
        CampaignRule(none_of=["weather.rain"])


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
