"""The thermal and CPU budgets' decisions, driven by a file standing in for the sysfs node and a fake clock."""

from pathlib import Path

import pytest

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.budget_cpu import Pacer
from retrofit_agent.daemon.config import AgentConfig, BudgetConfig, load_config
from retrofit_agent.daemon.thermal import ThermalGovernor, resolve_zone


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _zone(tmp_path: Path, celsius: float) -> Path:
    path = tmp_path / "temp"
    path.write_text(f"{int(celsius * 1000)}\n")
    return path


def _run(pacer: Pacer, clock: Clock, seconds: float, fps: float = 30.0, busy: float = 0.02) -> list[float]:
    """Feed frames at ``fps`` for ``seconds``; returns the times the model ran."""
    ran, end = [], clock.t + seconds
    while clock.t < end:
        pacer.tick(clock.t)
        if pacer.admit(clock.t) is None:
            ran.append(clock.t)
            pacer.processed(clock.t, clock.t + busy)
        clock.t += 1 / fps
    return ran


def test_crossing_high_lowers_the_rate_within_2_s_and_it_recovers_within_10_s(tmp_path: Path):
    cfg = BudgetConfig(max_fps=20)
    zone = _zone(tmp_path, 60)
    clock = Clock()
    pacer = Pacer(cfg, ThermalGovernor(zone, cfg), cpu_clock=lambda: 0.0, clock=clock)
    cool = len(_run(pacer, clock, 5.0)) / 5.0
    zone.write_text("85000\n")
    _run(pacer, clock, 2.0)
    assert pacer.thermal is not None and pacer.thermal.state == "throttled"
    hot = len(_run(pacer, clock, 3.0)) / 3.0
    assert hot < 0.75 * cool
    zone.write_text("70000\n")  # below high - hysteresis
    _run(pacer, clock, 10.0)
    assert pacer.thermal.state == "ok"
    assert len(_run(pacer, clock, 3.0)) / 3.0 == pytest.approx(cool, rel=0.1)


def test_critical_drops_to_the_floor_rate_and_the_hysteresis_band_holds_it(tmp_path: Path):
    cfg = BudgetConfig(thermal_floor_fps=2.0)
    zone = _zone(tmp_path, 95)
    clock = Clock()
    pacer = Pacer(cfg, ThermalGovernor(zone, cfg), cpu_clock=lambda: 0.0, clock=clock)
    ran = _run(pacer, clock, 10.0)
    assert pacer.thermal is not None and pacer.thermal.state == "critical"
    assert len(ran) / 10.0 == pytest.approx(2.0, abs=0.3)
    zone.write_text("78000\n")  # under high, inside the hysteresis band: no recovery yet
    _run(pacer, clock, 5.0)
    assert pacer.thermal.state == "throttled" and pacer.thermal.factor < 1.0


def test_an_unreadable_sensor_is_unknown_and_holds_the_rate(tmp_path: Path):
    cfg = BudgetConfig()
    gov = ThermalGovernor(tmp_path / "missing", cfg)
    gov.poll(0.0)
    assert gov.state == "unknown" and gov.factor == 1.0


def test_skipped_frames_name_their_reason(tmp_path: Path):
    cfg = BudgetConfig(max_fps=5)
    clock = Clock()
    pacer = Pacer(cfg, None, cpu_clock=lambda: 0.0, clock=clock)
    reasons = []
    for _ in range(30):
        pacer.tick(clock.t)
        r = pacer.admit(clock.t)
        reasons.append(r)
        if r is None:
            pacer.processed(clock.t, clock.t + 0.01)
        clock.t += 1 / 30
    assert reasons.count(None) == 5 and set(reasons) == {None, "budget"}


def test_the_cpu_budget_settles_at_the_rate_whose_cpu_use_is_the_budget():
    """A simulated process: 10 ms of CPU per frame arriving (decode) plus 40 ms per inference."""
    cfg = BudgetConfig(max_cpu=0.5, cpu_window_s=5)
    clock = Clock()
    cpu = [0.0]
    pacer = Pacer(cfg, None, cpu_clock=lambda: cpu[0], clock=clock)
    ran = []
    for _ in range(30 * 60):
        cpu[0] += 0.010
        pacer.tick(clock.t)
        if pacer.admit(clock.t) is None:
            cpu[0] += 0.040
            ran.append(clock.t)
            pacer.processed(clock.t, clock.t + 0.04)
        clock.t += 1 / 30
    late = [t for t in ran if t > 20]
    rate = (len(late) - 1) / (late[-1] - late[0])
    assert 0.3 + 0.04 * rate == pytest.approx(0.5, abs=0.05)  # cores used: decode + inference
    gaps = sorted(b - a for a, b in zip(late, late[1:], strict=False))
    assert gaps[int(0.9 * len(gaps))] / gaps[int(0.1 * len(gaps))] <= 1.5


def test_thermal_zone_auto_finds_the_first_zone_only_where_it_exists(tmp_path: Path):
    assert resolve_zone("off") is None
    assert resolve_zone("auto", tmp_path / "none") is None
    assert resolve_zone("auto", _zone(tmp_path, 40)) == tmp_path / "temp"
    assert resolve_zone("/x/temp") == Path("/x/temp")


@pytest.mark.parametrize(
    "section,match",
    [
        ({"max_cpu": 0}, "budget.max_cpu"),
        ({"max_fps": -1}, "budget.max_fps"),
        ({"thermal_high_c": 90, "thermal_critical_c": 85}, "thermal_critical_c"),
        ({"thermal_step": 1.5}, "budget.thermal_step"),
        ({"cpu_window_s": 0.1}, "budget.cpu_window_s"),
        ({"max_gpu": 1}, "budget.max_gpu"),
    ],
)
def test_the_budget_section_refuses_bad_values_naming_the_key(section, match):
    with pytest.raises(ConfigError, match=match):
        load_config(flags={f"budget.{k}": v for k, v in section.items()})


def test_the_budget_section_defaults_to_no_cpu_limit_and_an_auto_thermal_zone():
    b = AgentConfig().budget
    assert b.max_cpu is None and b.max_fps is None and b.thermal_zone == "auto"
