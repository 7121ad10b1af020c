"""The distillation, assembled: what ``retrofit-model distill`` runs.

The trainer lives in parts: :mod:`~retrofit_agent.train.setup` (device, precision,
models, bank, data, cache, optimisers), :mod:`~retrofit_agent.train.targets` (a step's
views and the teacher's targets), :mod:`~retrofit_agent.train.loop` (the steps and the
driver), :mod:`~retrofit_agent.train.heldout` (held-out evaluation) and
:mod:`~retrofit_agent.train.checkpoint` (checkpoint state). This module names the entry
points callers use.
"""

from __future__ import annotations

from retrofit_agent.train.loop import STUDENT_FILE, Distiller
from retrofit_agent.train.setup import WarmupCosine, param_groups, resolve_device, resolve_precision

__all__ = ["STUDENT_FILE", "Distiller", "WarmupCosine", "param_groups", "resolve_device", "resolve_precision"]
