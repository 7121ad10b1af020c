"""The model-dependent half of the daemon, and its builder: verify, load, warm up."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from retrofit_agent.contract.bundle import Bundle, load_bundle
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.preprocess import Preprocessor, to_bgr8
from retrofit_agent.daemon.config import AgentConfig
from retrofit_agent.daemon.labelling import ZeroShotLabeler

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
    generation: int = field(default_factory=lambda: next(_generations))

    @property
    def model_id(self) -> str:
        return self.bundle.manifest.model_id

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
    embedder = Embedder.from_file(bundle.model_path, m.model, cfg.model.intra_op_threads)
    labeler = ZeroShotLabeler(bundle.bank, m.bank, cfg.labels)
    embedder.warmup(cfg.model.warmup_runs)
    log.info(
        "model_loaded", model=m.model_id, architecture=m.model.architecture, quantization=m.model.quantization.mode,
        teacher=m.embedding_space.teacher, labels=len(bundle.bank.labels), seconds=round(time.monotonic() - t0, 3),
    )
    return ModelPipeline(bundle=bundle, preprocess=Preprocessor(m.model.input), embedder=embedder, labeler=labeler)
