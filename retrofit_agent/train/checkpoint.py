"""Checkpoints that resume exactly: weights, optimiser, schedule, scaler, step and RNG.

:class:`RunState` is the loop's own state; :func:`training_state` and
:func:`restore_training` move a whole run into and out of a checkpoint.

Layout: ``<out>/checkpoints/step-00001000/state.pt`` (rank 0: everything shared) and
``rng-rank<r>.pt`` (each rank's RNG streams differ), written into a temporary directory
that is renamed when complete, so a crash mid-save never leaves a half checkpoint as
"last". ``<out>/checkpoints/last`` names the newest complete one.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.train.distributed import DistEnv, barrier

if TYPE_CHECKING:
    from retrofit_agent.train.setup import Models, Optimisers

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


# --------------------------------------------------------------------------- the run's state


@dataclass
class RunState:
    """What the loop carries between steps besides the models and optimisers."""

    step: int = 0
    skipped: set[str] = field(default_factory=set)
    initial_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    images_per_s: list[float] = field(default_factory=list)


def training_state(models: Models, optim: Optimisers, run: RunState, env: DistEnv, config: dict) -> dict[str, Any]:
    """Everything an exact resume needs (rank 0's copy; RNG streams are saved per rank)."""
    return {
        "step": run.step,
        "world": env.world,
        "config": config,
        "student": models.student.state_dict(),
        "projectors": models.loss.state_dict(),
        "discriminator": models.disc.state_dict() if models.disc else None,
        "optimizer": optim.optimizer.state_dict(),
        "scheduler": optim.scheduler.state_dict(),
        "scaler": optim.scaler.state_dict(),
        "disc_optimizer": optim.disc_optimizer.state_dict() if optim.disc_optimizer else None,
        "skipped": sorted(run.skipped),
        "initial_eval": run.initial_eval,
        "teacher": models.teacher.identity,
        "fingerprint": models.teacher.fingerprint(),
    }


def restore_training(path: Path, models: Models, optim: Optimisers, run: RunState, env: DistEnv) -> bool:
    """Load a checkpoint into the run; True when this rank's RNG streams were restored too (exact resume)."""
    state, rng = load_checkpoint(path, env)
    if state["fingerprint"] != models.teacher.fingerprint():
        raise ConfigError(f"checkpoint {path} was trained against another teacher ({state['teacher']})")
    models.student.load_state_dict(state["student"])
    models.loss.load_state_dict(state["projectors"])
    if models.disc is not None and state["discriminator"] is not None and optim.disc_optimizer is not None:
        models.disc.load_state_dict(state["discriminator"])
        optim.disc_optimizer.load_state_dict(state["disc_optimizer"])
    optim.optimizer.load_state_dict(state["optimizer"])
    optim.scheduler.load_state_dict(state["scheduler"])
    optim.scaler.load_state_dict(state["scaler"])
    run.step = state["step"]
    run.skipped.update(state["skipped"])
    run.initial_eval = state["initial_eval"]
    if rng is not None:
        set_rng_state(rng)
    return rng is not None
