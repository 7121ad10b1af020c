"""The model-dependent half of the daemon, and its builder: verify, load, warm up."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from retrofit_agent.contract.bundle import Bundle, load_bundle
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.preprocess import Preprocessor, to_bgr8
from retrofit_agent.daemon.config import AgentConfig
from retrofit_agent.daemon.labelling import ZeroShotLabeler
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


def build_pipeline(cfg: AgentConfig, log: structlog.typing.FilteringBoundLogger) -> ModelPipeline:
    """Load and fully verify the bundle, open and warm up the session. Raises RetrofitError."""
    t0 = time.monotonic()
    bundle = load_bundle(cfg.model.bundle, cfg.model.signing_public_key)
    m = bundle.manifest
    if not m.trained:
        log.warning("bundle_untrained", model=m.model_id, notice=m.notice)
    labeler = ZeroShotLabeler(bundle.bank, m.bank, cfg.labels)
    # Timing candidates also warms the winner up; by CPU time when a CPU budget binds.
    choice = Tuner(m, bundle.root, cfg.model, by_cpu=cfg.budget.max_cpu is not None).choose()
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
    return ModelPipeline(
        bundle=bundle, preprocess=Preprocessor(m.model.input), embedder=choice.embedder, labeler=labeler, choice=choice
    )
