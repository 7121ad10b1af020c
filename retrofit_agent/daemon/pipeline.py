"""Builds the model-dependent half of the daemon from a bundle: verify, load, warm up."""

from __future__ import annotations

import time

import structlog

from retrofit_agent.daemon.agent import ModelPipeline
from retrofit_agent.contract.bundle import load_bundle
from retrofit_agent.daemon.config import AgentConfig
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.daemon.labelling import ZeroShotLabeler
from retrofit_agent.contract.preprocess import Preprocessor


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
