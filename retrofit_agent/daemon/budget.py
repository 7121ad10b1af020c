"""The memory budget: what a config can hold in frames, checked at start-up.

Frames are the only memory the config controls: the grabber's newest frame, the one being
labelled, the one being prepared, the pre-trigger ring and the capture queue. Each is
bounded (frames are downscaled to ``camera.max_frame_width`` x ``max_frame_height`` at
capture; the ring and the queue are bounded in bytes), so the worst case is a sum, and a
config whose worst case cannot fit is refused before it can be killed by the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.messages import TOPICS
from retrofit_agent.daemon.config import AgentConfig

MB = 1024**2
# Peak RSS of the runtime with the reference bundle loaded and warmed up, before any frame
# buffers (measured 178-180 MB on x86-64 and aarch64; README "Reliability"), plus headroom
# for the decoder's own buffers of a source at the frame cap.
RUNTIME_BYTES = 230 * MB
FRAMES_IN_FLIGHT = 4  # newest, being labelled, being prepared, and the decoder's output
# Decoding happens before any downscale, at the source's own size: the decoder's reference
# frames (YUV 4:2:0, 1.5 bytes a pixel; H.264 keeps up to ~6 at 8K) plus OpenCV's BGR
# conversion buffer and the copy it hands out (3 bytes a pixel each). Measured: an 8K
# H.264 file alone peaks at 479 MB RSS in a bare OpenCV read loop.
DECODER_REFERENCE_FRAMES = 6


@dataclass(frozen=True)
class MemoryEstimate:
    runtime: int
    frames: int
    ring: int
    queue: int
    decoder: int = 0
    replay: int = 0

    @property
    def total(self) -> int:
        return self.runtime + self.frames + self.ring + self.queue + self.decoder + self.replay

    def describe(self) -> str:
        parts = (
            ("runtime", self.runtime),
            ("decoder", self.decoder),
            ("frames", self.frames),
            ("pre-trigger ring", self.ring),
            ("capture queue", self.queue),
            ("replay", self.replay),
        )
        return ", ".join(f"{name} {size / MB:.0f} MB" for name, size in parts if size)


def decoder_bytes(width: int, height: int) -> int:
    pixels = width * height
    return int(pixels * (1.5 * DECODER_REFERENCE_FRAMES + 3 * 2))


def estimate(cfg: AgentConfig, model_bytes: int = 0, source: tuple[int, int] | None = None) -> MemoryEstimate:
    cam, collect = cfg.camera, cfg.collect
    frame = cam.max_frame_width * cam.max_frame_height * 3
    pre_trigger = any(c.frames_before for c in collect.campaigns)
    return MemoryEstimate(
        runtime=RUNTIME_BYTES + 2 * model_bytes,  # the file, and onnxruntime's copy of it
        frames=FRAMES_IN_FLIGHT * frame,
        ring=collect.store.ring_max_bytes if pre_trigger else 0,
        queue=collect.store.queue_max_bytes if collect.campaigns else 0,
        decoder=decoder_bytes(*source) if source else 0,
        replay=len(TOPICS) * cfg.publish.replay_bytes_per_topic if cfg.publish.replay else 0,
    )


def cgroup_memory_limit(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This process's cgroup memory limit (the unit's MemoryMax), or None if unlimited or unknown.

    cgroup v2 (``0::/path`` → ``memory.max``) and v1 (``N:memory:/path`` → ``memory.limit_in_bytes``,
    where "unlimited" is a huge number).
    """
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            where = root / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            where = root / "memory" / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            value = where.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:
            return int(value)
        return None
    return None


def check_memory_budget(
    cfg: AgentConfig, model_bytes: int = 0, limit: int | None = None, source: tuple[int, int] | None = None
) -> MemoryEstimate:
    """Raise ConfigError if the config's worst case (with a source of that size) cannot fit the budget."""
    need = estimate(cfg, model_bytes, source)
    budget: int | None
    if cfg.limits.memory_mb is not None:
        budget, origin = cfg.limits.memory_mb * MB, "limits.memory_mb"
    else:
        budget, origin = (limit if limit is not None else cgroup_memory_limit()), "the service's MemoryMax"
    if budget is not None and need.total > budget:
        what = f"a {source[0]}x{source[1]} source and its frames need" if source else "frames need"
        raise ConfigError(
            f"config error: {what} up to {need.total / MB:.0f} MB ({need.describe()}) but {origin} is "
            f"{budget / MB:.0f} MB; lower camera.max_frame_width/max_frame_height, collect.store.queue_max_bytes "
            "or collect.store.ring_max_bytes, publish.replay_bytes_per_topic, or raise the budget"
        )
    return need
