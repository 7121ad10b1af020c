"""The model-dependent half of the daemon, and its builder: verify, load, warm up."""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from retrofit_agent.contract.bundle import Bundle, load_bundle
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.preprocess import Preprocessor, to_bgr8
from retrofit_agent.contract.regions import Region, RegionFinder
from retrofit_agent.daemon.config import AgentConfig, RegionsConfig
from retrofit_agent.daemon.labelling import LabelResult, ZeroShotLabeler
from retrofit_agent.daemon.variants import Candidate, Choice, Tuner

_generations = itertools.count(1)


@dataclass
class ModelPipeline:
    """Everything that depends on the bundle; built and warmed up before it is used.

    ``generation`` tells frames prepared by this pipeline (on the grabber thread) from
    frames prepared by the one a reload replaced.
    """

    bundle: Bundle
    preprocess: Preprocessor
    embedder: Embedder
    labeler: ZeroShotLabeler
    choice: Choice | None = None  # which variant, threads and spinning start-up timing chose
    regions: RegionFinder | None = None  # None: no regions (the reason is in regions_unavailable)
    regions_unavailable: str | None = None
    generation: int = field(default_factory=lambda: next(_generations))

    @property
    def model_id(self) -> str:
        return self.bundle.manifest.model_id

    @property
    def model_path(self) -> Path:
        """The encoder file actually running (a variant's, when the bundle has several)."""
        return self.bundle.model_path if self.choice is None else self.bundle.root / self.choice.spec.file

    @property
    def running(self) -> Candidate | None:
        return None if self.choice is None else self.choice.candidate

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Raw frame → model input; raises BadFrameError for frames that cannot be used."""
        return self.preprocess(to_bgr8(image))

    def infer(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The unit embedding and, when regions are on, the cell embeddings of the same pass."""
        if self.regions is None:
            return self.embedder.embed(tensor), None
        return self.embedder.embed_with_cells(tensor)

    def find_regions(self, cells: np.ndarray | None, result: LabelResult, frame_hw: tuple[int, int]) -> list[Region]:
        """Boxes for the frame's active tags, the best-scoring first (the finder keeps the first K)."""
        if self.regions is None or cells is None or not result.tags:
            return []
        active = [t.key for t in sorted(result.tags, key=lambda t: -t.score)]
        return self.regions(cells, active, frame_hw)

    def with_regions_of(self, other: ModelPipeline) -> ModelPipeline:
        """This pipeline (same session, labeller state and generation) with ``other``'s region settings."""
        return dataclasses.replace(self, regions=other.regions, regions_unavailable=other.regions_unavailable)


def build_pipeline(cfg: AgentConfig, log: structlog.typing.FilteringBoundLogger) -> ModelPipeline:
    """Load and fully verify the bundle, open and warm up the session. Raises RetrofitError."""
    t0 = time.monotonic()
    bundle = load_bundle(cfg.model.bundle, cfg.model.signing_public_key)
    m = bundle.manifest
    if not m.trained:
        log.warning("bundle_untrained", model=m.model_id, notice=m.notice)
    labeler = ZeroShotLabeler(bundle.bank, m.bank, cfg.labels)
    finder, unavailable = build_regions(bundle, cfg.regions)
    # Timing candidates also warms the winner up; by CPU time when a CPU budget binds. It
    # times the pass the frame loop runs: with the cell output when regions will read it.
    choice = Tuner(m, bundle.root, cfg.model, by_cpu=cfg.budget.max_cpu is not None, cells=finder is not None).choose()
    c = choice.candidate
    log.info(
        "model_tuned",
        variant=c.variant,
        threads=c.threads,
        spinning=c.spinning,
        seconds=round(choice.seconds, 3),
        trials=choice.describe(),
        skipped=choice.skipped,
        by="cpu" if cfg.budget.max_cpu is not None else "latency",
    )
    log.info(
        "model_loaded",
        model=m.model_id,
        architecture=m.model.architecture,
        quantization=choice.spec.quantization.mode,
        teacher=m.embedding_space.teacher,
        labels=len(bundle.bank.labels),
        seconds=round(time.monotonic() - t0, 3),
    )
    if finder is None:
        log.info("regions_unavailable", model=m.model_id, reason=unavailable)
    else:
        log.info(
            "regions_enabled",
            model=m.model_id,
            labels=list(finder.localized),
            grid=list(m.model.dense.grid) if m.model.dense else None,
            threshold=finder.threshold,
            max_labels=finder.max_labels,
        )
    return ModelPipeline(
        bundle=bundle,
        preprocess=Preprocessor(m.model.input),
        embedder=choice.embedder,
        labeler=labeler,
        choice=choice,
        regions=finder,
        regions_unavailable=unavailable,
    )


def build_regions(bundle: Bundle, cfg: RegionsConfig) -> tuple[RegionFinder | None, str | None]:
    """The region finder, or None and why not. Raises ConfigError for a bad ``regions.labels``.

    The labels are checked against the bank even where regions cannot run (no cell output),
    so a typo is refused today rather than on the day the bundle gains cells.
    """
    m = bundle.manifest
    if not cfg.enabled:
        return None, "regions.enabled is false"
    finder = RegionFinder(
        bundle.bank,
        m.bank,
        m.model.input,
        threshold=cfg.threshold,
        max_labels=cfg.max_labels,
        max_boxes=cfg.max_boxes,
        labels=cfg.labels,
    )
    # Every variant shares ModelSpec.dense (Manifest.model_variants copies the model spec), so
    # the bundle's answer holds for whichever encoder the tuner picks.
    if m.model.dense is None:
        return None, "the bundle's model has no cell output (export it with 'retrofit-model export --dense')"
    if not finder.localized:
        return None, "no label is localized (mark labels 'localize = true' in the prompts file, or set regions.labels)"
    return finder, None
