"""Checkpoints that resume exactly: weights, optimiser, schedule, scaler, step and RNG.

Layout: ``<out>/checkpoints/step-00001000/state.pt`` (rank 0: everything shared) and
``rng-rank<r>.pt`` (each rank's RNG streams differ), written into a temporary directory
that is renamed when complete, so a crash mid-save never leaves a half checkpoint as
"last". ``<out>/checkpoints/last`` names the newest complete one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.train.distributed import DistEnv, barrier

LAST = "last"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, state: dict[str, Any], env: DistEnv, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    torch.save(rng_state(), tmp / f"rng-rank{env.rank}.pt")
    if env.is_main:
        torch.save(state, tmp / "state.pt")
    barrier(env)
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / LAST).write_text(final.name + "\n")
        _prune(root, keep)
    barrier(env)
    return final


def _prune(root: Path, keep: int) -> None:
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(resume: str | Path, root: Path) -> Path | None:
    """The checkpoint directory to resume from: 'auto' → last (if any), 'never' → None."""
    if resume == "never":
        return None
    if resume == "auto":
        marker = root / LAST
        return root / marker.read_text().strip() if marker.exists() else None
    path = Path(resume)
    if not (path / "state.pt").exists():
        raise ConfigError(f"run.resume: {path} is not a checkpoint directory (no state.pt)")
    return path


def load_checkpoint(path: Path, env: DistEnv) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(shared state, this rank's RNG state or None when the world size changed)."""
    # weights_only=False: the state holds RNG tuples and numpy arrays we wrote ourselves.
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    rng_file = path / f"rng-rank{env.rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.exists() and state.get("world") == env.world else None
    return state, rng
