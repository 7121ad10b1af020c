"""The CPU budget: space inferences evenly so the process stays within ``budget.max_cpu`` cores.

:class:`Pacer` decides, for each fresh frame, whether the model runs on it now or the frame
is skipped (counted apart from frames dropped while the model was busy). The interval
between inferences is the largest of

- ``1 / budget.max_fps``;
- the process's CPU seconds per processed frame over the last ``cpu_window_s``, divided
  by ``budget.max_cpu``. Everything the process spends counts (decoding, preprocessing,
  publishing, skipped frames), so the rate it settles at is the one whose total CPU use
  is the budget: a feedback loop, not a model of the costs;
- the thermal governor's interval, when the SoC runs hot.

Inferences are due on a fixed schedule (``due += interval``), not ``interval`` after the
last one, so the average rate is exact; a schedule that fell behind (a slow inference)
restarts from now instead of bursting. The frame loop waits until an inference is due and
then takes the newest frame (the frames replaced meanwhile are budget skips), rather than
skipping frames until one arrives after the due time: that would round every interval to a
whole number of camera frames and spread them unevenly (2 and 4 frames for 2.97).
CPU time comes from ``time.process_time()`` (all threads of the process, like
/proc/self/stat's utime + stime, in nanoseconds instead of ticks).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Literal

import structlog

from retrofit_agent.daemon.config import BudgetConfig
from retrofit_agent.daemon.thermal import ThermalGovernor, resolve_zone

SkipReason = Literal["budget", "thermal"]
EMA = 0.2


class Pacer:
    def __init__(
        self,
        cfg: BudgetConfig,
        thermal: ThermalGovernor | None = None,
        cpu_clock: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.thermal = thermal
        self._cpu_clock = cpu_clock
        now = clock()
        self._samples: deque[tuple[float, float, int]] = deque([(now, cpu_clock(), 0)])
        self._processed = 0
        self._due = now
        self._busy = 0.0  # EMA of one inference's wall time: the unthrottled interval
        self.base_interval = 0.0
        self.interval = 0.0

    @property
    def limited(self) -> bool:
        return self.cfg.max_fps is not None or self.cfg.max_cpu is not None or self.thermal is not None

    def tick(self, now: float) -> None:
        """Once per loop turn: poll the thermal sensor and recompute the interval."""
        if self.thermal is not None:
            self.thermal.poll(now)
        self._recompute()

    def wait_s(self, now: float) -> float:
        """How long until the next inference is due (0: now)."""
        return max(0.0, self._due - now)

    def reason(self, now: float) -> SkipReason:
        """Why a frame before the due time waits: the thermal governor's share, or the budget's."""
        return "thermal" if now >= self._due - self.interval + self.base_interval else "budget"

    def admit(self, now: float) -> SkipReason | None:
        """None when the model should run on a frame that arrived ``now``, else why not."""
        if now >= self._due:
            self._due = self._due + self.interval if now - self._due < self.interval else now + self.interval
            return None
        return "thermal" if now >= self._due - self.interval + self.base_interval else "budget"

    def processed(self, started: float, finished: float) -> None:
        """A frame went through the model between ``started`` and ``finished`` (monotonic)."""
        busy = max(0.0, finished - started)
        self._busy = busy if self._processed == 0 else (1 - EMA) * self._busy + EMA * busy
        self._processed += 1
        self._samples.append((finished, self._cpu_clock(), self._processed))
        while len(self._samples) > 2 and finished - self._samples[1][0] >= self.cfg.cpu_window_s:
            self._samples.popleft()
        self._recompute()

    def cpu_cores(self) -> float:
        """Process CPU use over the window, in cores."""
        (t0, c0, _), (t1, c1, _) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    def _cpu_per_frame(self) -> float | None:
        (_, c0, n0), (_, c1, n1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (n1 - n0) if n1 > n0 else None

    def _recompute(self) -> None:
        base = 0.0
        if self.cfg.max_fps is not None:
            base = 1.0 / self.cfg.max_fps
        if self.cfg.max_cpu is not None:
            per_frame = self._cpu_per_frame()
            if per_frame is not None:
                base = max(base, per_frame / self.cfg.max_cpu)
        self.base_interval = base
        self.interval = base if self.thermal is None else self.thermal.interval(base, max(base, self._busy))

    def rate_limit_fps(self) -> float:
        return 1.0 / self.interval if self.interval > 0 else float("inf")


def build_pacer(cfg: BudgetConfig, log: structlog.typing.FilteringBoundLogger) -> Pacer | None:
    """The pacer the config asks for; None when nothing limits the model (no cost per frame)."""
    zone = resolve_zone(cfg.thermal_zone)
    thermal = None if zone is None else ThermalGovernor(zone, cfg)
    pacer = Pacer(cfg, thermal)
    if not pacer.limited:
        return None
    log.info(
        "budget",
        max_fps=cfg.max_fps,
        max_cpu=cfg.max_cpu,
        cpu_window_s=cfg.cpu_window_s,
        thermal_zone=None if zone is None else str(zone),
        thermal_high_c=cfg.thermal_high_c,
        thermal_critical_c=cfg.thermal_critical_c,
    )
    return pacer
