"""Campaign rules over tags and regions: condition, minimum duration, rate limits. Pure logic, no I/O."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping, Sequence

from retrofit_agent.contract.regions import Region
from retrofit_agent.daemon.config import CampaignConfig, CampaignRule, RegionRule

HOUR_S = 3600.0


class Decision(enum.Enum):
    IDLE = "idle"  # the condition does not hold
    WAITING = "waiting"  # it holds, but not yet for min_duration_s
    TRIGGER = "trigger"  # capture now
    RATE_LIMITED = "rate_limited"  # it holds long enough, but a rate limit says not now


def region_matches(rule: RegionRule, regions: Sequence[Region]) -> bool:
    """Whether one of the label's boxes has its centre in the ranges and at least the area."""
    (x0, x1), (y0, y1) = rule.centre_x, rule.centre_y
    for r in regions:
        x, y = r.centre
        if r.key == rule.label and x0 <= x <= x1 and y0 <= y <= y1 and r.area >= rule.min_area:
            return True
    return False


def rule_matches(rule: CampaignRule, tags: Mapping[str, float], regions: Sequence[Region] = ()) -> bool:
    """``tags`` maps each tag that is on ('group.label') to its score; ``regions`` are the frame's boxes."""
    strong = {k for k, score in tags.items() if score >= rule.min_score}
    if rule.any_of and not strong.intersection(rule.any_of):
        return False
    if any(k not in strong for k in rule.all_of):
        return False
    if any(k in tags for k in rule.none_of):
        return False
    return rule.region is None or region_matches(rule.region, regions)


class CampaignState:
    """Tracks one campaign across frames. ``now`` is a monotonic clock in seconds."""

    def __init__(self, cfg: CampaignConfig) -> None:
        self.cfg = cfg
        self._holding_since: float | None = None
        self._triggers: deque[float] = deque()

    def update(self, tags: Mapping[str, float], now: float, regions: Sequence[Region] = ()) -> Decision:
        if not rule_matches(self.cfg.rule, tags, regions):
            self._holding_since = None
            return Decision.IDLE
        if self._holding_since is None:
            self._holding_since = now
        if now - self._holding_since < self.cfg.rule.min_duration_s:
            return Decision.WAITING
        while self._triggers and now - self._triggers[0] >= HOUR_S:
            self._triggers.popleft()
        if self._triggers and now - self._triggers[-1] < self.cfg.min_interval_s:
            return Decision.RATE_LIMITED
        if len(self._triggers) >= self.cfg.max_per_hour:
            return Decision.RATE_LIMITED
        self._triggers.append(now)
        return Decision.TRIGGER
