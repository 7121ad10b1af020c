"""torchrun / DistributedDataParallel plumbing, kept out of the training loop.

``torchrun --nproc_per_node N [--nnodes M ...] -m retrofit_agent.train.cli distill ...``
sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process and none
of this does anything. NCCL on CUDA, gloo on CPU (which is what the tests use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistEnv:
    """Join the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return env


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def mean_across(env: DistEnv, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce for the whole dict)."""
    if not env.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / env.world for k, v in zip(keys, t.tolist())}


def average_gradients(env: DistEnv, module: torch.nn.Module) -> None:
    """All-reduce gradients of a module that is not wrapped in DDP (the discriminator)."""
    if not env.enabled:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= env.world


def sync_buffers(env: DistEnv, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers at the start of each forward, so after the last step each rank
    still holds stats updated with its own last batch; this makes the ranks' models equal.
    """
    if not env.enabled:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)
