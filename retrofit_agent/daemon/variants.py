"""Start-up tuning: which of the bundle's encoders, how many intra-op threads, spinning or not.

Chosen by measurement on the device, within a bounded time (``model.tune_budget_s``), in
three stages that each keep the best so far: every variant at the configured (or all-core)
thread count, timed in alternation so that load from elsewhere falls on all of them alike; then the other thread counts for the winning variant; then spinning flipped.
Each trial opens a session, runs it once untimed and then ``TIMED_RUNS`` times; its score
is the lower quartile of those runs (noise on a shared core only ever adds time). Scored
by wall time per inference, or by process CPU time per inference when a CPU budget is set
(then the cheapest, not the quickest, configuration lets the most frames through).
A trial that would not fit in what is left of the budget is not started; the first always
runs, because the model has to be warmed up anyway. Configured values are never overridden.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrofit_agent.contract.bundle import Manifest, ModelSpec
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.config import ModelConfig
from retrofit_agent.daemon.metrics import BudgetMetrics

TIMED_RUNS = 4
RACE_RUNS = 6  # per variant, alternating
# A challenger on threads or spinning must beat the incumbent by this much: fewer threads
# and no spinning leave CPU to the grabber, so a draw goes to the lighter setting.
MARGIN = 0.05


@dataclass(frozen=True)
class Candidate:
    variant: str
    threads: int
    spinning: bool

    @property
    def label(self) -> str:
        """As the status message names it: 'int8/2t/nospin'."""
        return f"{self.variant}/{self.threads}t/{'spin' if self.spinning else 'nospin'}"


@dataclass(frozen=True)
class Trial:
    candidate: Candidate
    wall_s: float  # lower-quartile wall seconds per inference
    cpu_s: float  # process CPU seconds per inference (all threads)
    seconds: float  # what the trial cost, session opening included

    def describe(self) -> dict[str, Any]:
        c = self.candidate
        return {
            "variant": c.variant,
            "threads": c.threads,
            "spinning": c.spinning,
            "ms": round(self.wall_s * 1e3, 2),
            "cpu_ms": round(self.cpu_s * 1e3, 2),
        }


@dataclass
class Choice:
    embedder: Embedder
    spec: ModelSpec
    candidate: Candidate
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0
    skipped: int = 0  # trials the budget left out

    def describe(self) -> list[dict[str, Any]]:
        return [t.describe() for t in self.trials]


def record(choice: Choice, metrics: BudgetMetrics) -> None:
    """The choice and every trial's timing, on the metrics."""
    c = choice.candidate
    metrics.variant.info(
        {
            "variant": c.variant,
            "threads": str(c.threads),
            "spinning": str(c.spinning).lower(),
            "tuning_seconds": f"{choice.seconds:.3f}",
        }
    )
    metrics.variant_inference_seconds.clear()
    for t in choice.trials:
        tc = t.candidate
        metrics.variant_inference_seconds.labels(
            variant=tc.variant, threads=str(tc.threads), spinning=str(tc.spinning).lower()
        ).set(t.wall_s)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_options(cores: int) -> list[int]:
    """1, 2, 4, ... up to the cores, and the cores themselves."""
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return [*out, cores]


class Tuner:
    def __init__(
        self,
        manifest: Manifest,
        root: Path,
        cfg: ModelConfig,
        by_cpu: bool = False,
        clock: Callable[[], float] = time.monotonic,
        cores: int | None = None,
        cells: bool = False,
    ) -> None:
        """``cells``: time the pass with the cell output too, as the frame loop runs it with regions."""
        self.variants = manifest.model_variants()
        if cfg.variant is not None:
            if cfg.variant not in self.variants:
                raise ConfigError(
                    f"model.variant: bundle has no variant {cfg.variant!r} (it has "
                    f"{sorted(self.variants)}); unset it to pick the fastest"
                )
            self.variants = {cfg.variant: self.variants[cfg.variant]}
        self.root = root
        self.cfg = cfg
        self.by_cpu = by_cpu
        self.clock = clock
        self.cores = cores or usable_cores()
        self.cells = cells
        self._t0 = 0.0
        self._best: tuple[Trial, Embedder] | None = None
        self.trials: list[Trial] = []
        self.skipped = 0

    def choose(self) -> Choice:
        cfg = self.cfg
        self._t0 = self.clock()
        threads = cfg.intra_op_threads or self.cores
        spin = cfg.spinning == "on"
        names = list(self.variants)
        if cfg.tune_budget_s == 0 or (len(names) == 1 and cfg.intra_op_threads and cfg.spinning != "auto"):
            return self._untimed(Candidate(names[0], threads, spin))
        self._race([Candidate(name, threads, spin) for name in names])
        best = self._winner()
        if not cfg.intra_op_threads:
            for n in thread_options(self.cores):
                if n != best.threads:
                    self._try(Candidate(best.variant, n, best.spinning), margin=MARGIN)
            best = self._winner()
        if cfg.spinning == "auto":
            self._try(Candidate(best.variant, best.threads, not best.spinning), margin=MARGIN)
        assert self._best is not None
        trial, embedder = self._best
        return Choice(
            embedder,
            self.variants[trial.candidate.variant],
            trial.candidate,
            self.trials,
            self.clock() - self._t0,
            self.skipped,
        )

    def _winner(self) -> Candidate:
        assert self._best is not None
        return self._best[0].candidate

    def _open(self, c: Candidate) -> Embedder:
        spec = self.variants[c.variant]
        return Embedder.from_file(self.root / spec.file, spec, c.threads, c.spinning)

    def _untimed(self, c: Candidate) -> Choice:
        embedder = self._open(c)
        embedder.warmup(self.cfg.warmup_runs)
        return Choice(embedder, self.variants[c.variant], c, [], self.clock() - self._t0)

    def _try(self, c: Candidate, margin: float) -> None:
        elapsed = self.clock() - self._t0
        cost = max((t.seconds for t in self.trials), default=0.0)
        if self.trials and elapsed + cost > self.cfg.tune_budget_s:
            self.skipped += 1
            return
        start = self.clock()
        embedder = self._open(c)
        embedder.warmup(max(1, self.cfg.warmup_runs - TIMED_RUNS))
        x = _zeros(embedder)
        walls, cpu0 = [], time.process_time()
        for _ in range(TIMED_RUNS):
            t = time.perf_counter()
            self._pass(embedder, x)
            walls.append(time.perf_counter() - t)
        cpu = (time.process_time() - cpu0) / TIMED_RUNS
        trial = Trial(c, float(np.sort(walls)[len(walls) // 4]), cpu, self.clock() - start)
        self.trials.append(trial)
        if self._best is None or self._score(trial) < self._score(self._best[0]) * (1 - margin):
            self._best = (trial, embedder)

    def _race(self, candidates: list[Candidate]) -> None:
        """The variants, timed in alternation (A, B, A, B, ...): a burst of load on a shared
        core then lands on all of them alike instead of deciding the race."""
        opened: list[tuple[Candidate, Embedder, float]] = []
        for c in candidates:
            cost = max((t.seconds for t in self.trials), default=0.0)
            if opened and self.clock() - self._t0 + cost > self.cfg.tune_budget_s:
                self.skipped += 1
                continue
            start = self.clock()
            embedder = self._open(c)
            embedder.warmup(max(1, self.cfg.warmup_runs - TIMED_RUNS))
            opened.append((c, embedder, self.clock() - start))
        walls: dict[Candidate, list[float]] = {c: [] for c, _, _ in opened}
        cpus: dict[Candidate, float] = {c: 0.0 for c, _, _ in opened}
        x = _zeros(opened[0][1])
        for _ in range(RACE_RUNS):
            for c, embedder, _ in opened:
                t, cpu0 = time.perf_counter(), time.process_time()
                self._pass(embedder, x)
                walls[c].append(time.perf_counter() - t)
                cpus[c] += time.process_time() - cpu0
        for c, embedder, opening in opened:
            trial = Trial(c, float(np.sort(walls[c])[len(walls[c]) // 4]), cpus[c] / RACE_RUNS, opening + sum(walls[c]))
            self.trials.append(trial)
            if self._best is None or self._score(trial) < self._score(self._best[0]):
                self._best = (trial, embedder)

    def _pass(self, embedder: Embedder, x: np.ndarray) -> None:
        if self.cells:
            embedder.embed_with_cells(x)
        else:
            embedder.embed_batch(x)

    def _score(self, t: Trial) -> float:
        return t.cpu_s if self.by_cpu else t.wall_s


def _zeros(embedder: Embedder) -> np.ndarray:
    spec = embedder.spec.input
    shape = (1, 3, spec.height, spec.width) if spec.layout == "NCHW" else (1, spec.height, spec.width, 3)
    return np.zeros(shape, dtype=np.float32)
