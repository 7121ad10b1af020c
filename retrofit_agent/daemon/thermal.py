"""The thermal budget: read the SoC's temperature, lower the model's rate while it runs hot.

A small state machine polled from the frame loop, at most every ``thermal_poll_s``:

- at or above ``thermal_critical_c``: ``critical``, the model runs at ``thermal_floor_fps``
  (and the factor is at most one step, so it leaves critical throttled);
- at or above ``thermal_high_c``: ``throttled``, the rate factor shrinks by
  ``thermal_step`` at each poll (down to ``MIN_FACTOR``), so the first poll above high
  already lowers the rate;
- between high minus ``thermal_hysteresis_c`` and high: the factor holds (a critical
  state eases to throttled);
- below high minus the hysteresis: the factor doubles at each poll back to 1, then ``ok``.

The sensor is a sysfs file in millidegrees Celsius (``/sys/class/thermal/thermal_zoneN/temp``);
tests hand it an ordinary file. A read that fails makes the state ``unknown`` and holds the
factor: a flaky sensor neither throttles nor un-throttles the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

import structlog

from retrofit_agent.daemon.config import BudgetConfig

ThermalState = Literal["ok", "throttled", "critical", "unknown"]
STATES: Final = ("ok", "throttled", "critical", "unknown")
DEFAULT_ZONE: Final = Path("/sys/class/thermal/thermal_zone0/temp")
MIN_FACTOR: Final = 0.05
RECOVERY: Final = 2.0  # factor multiplier per poll once cool

log = structlog.get_logger("retrofit_agent.daemon.thermal")


def resolve_zone(setting: str, default: Path = DEFAULT_ZONE) -> Path | None:
    """budget.thermal_zone as a path: 'off' is none, 'auto' the first zone where one exists."""
    if setting == "off":
        return None
    if setting == "auto":
        return default if default.is_file() else None
    return Path(setting)


def read_celsius(path: Path) -> float:
    """sysfs writes millidegrees; a value that small is taken as degrees already."""
    value = float(path.read_text(encoding="ascii").strip())
    return value / 1000.0 if abs(value) > 200 else value


class ThermalGovernor:
    def __init__(self, path: Path, cfg: BudgetConfig) -> None:
        self.path = path
        self.cfg = cfg
        self.state: ThermalState = "ok"
        self.factor = 1.0
        self.celsius: float | None = None
        self._next_poll = float("-inf")
        self._read_failed = False

    def poll(self, now: float) -> bool:
        """Read the sensor if a poll is due and step the state; True when it stepped."""
        if now < self._next_poll:
            return False
        self._next_poll = now + self.cfg.thermal_poll_s
        try:
            t = read_celsius(self.path)
        except (OSError, ValueError) as e:
            if not self._read_failed:
                log.warning("thermal_sensor_unreadable", path=str(self.path), error=str(e))
            self._read_failed = True
            self.state = "unknown"
            return True
        self._read_failed = False
        self.celsius = t
        self.step(t)
        return True

    def step(self, t: float) -> None:
        cfg, before = self.cfg, self.state
        if t >= cfg.thermal_critical_c:
            self.state = "critical"  # and leaves it throttled, not at full rate
            self.factor = max(MIN_FACTOR, min(self.factor, cfg.thermal_step))
        elif t >= cfg.thermal_high_c:
            self.factor = max(MIN_FACTOR, self.factor * cfg.thermal_step)
            self.state = "throttled"
        elif t >= cfg.thermal_high_c - cfg.thermal_hysteresis_c:
            if self.state in ("critical", "unknown"):
                self.state = "throttled" if self.factor < 1.0 else "ok"
        else:
            self.factor = min(1.0, self.factor * RECOVERY)
            self.state = "ok" if self.factor >= 1.0 else "throttled"
        if self.state != before:
            log.warning("thermal_state", state=self.state, previous=before, celsius=t, factor=round(self.factor, 3))

    def interval(self, base: float, natural: float) -> float:
        """Seconds between inferences under this state: ``base`` is the budget's interval,
        ``natural`` the one the model runs at unthrottled (at least ``base``)."""
        floor = 1.0 / self.cfg.thermal_floor_fps
        if self.state == "critical":
            return max(natural, floor)
        if self.factor >= 1.0:
            return base
        return max(base, min(natural / self.factor, floor))
