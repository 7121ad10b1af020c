"""The daemon's configuration: one validated pydantic model.

Sources, lowest precedence first: field defaults, a TOML file (``--config``), environment
variables (``RETROFIT_SECTION__FIELD``, e.g. ``RETROFIT_CAMERA__SOURCE``) and command-line
flags. Validators are pure: they never touch files or hardware (that is the components'
job at start-up).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.messages import VEHICLE_PATTERN
from retrofit_agent.contract.settings import deep_merge, env_overrides, format_validation_error, read_toml, set_path
from retrofit_agent.daemon.replay import replay_endpoint_for

ENV_PREFIX = "RETROFIT_"
ENV_CONFIG_FILE = "RETROFIT_CONFIG"


_TAG_KEY = r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(_Section):
    source: str = Field(
        "/dev/video0",
        description="V4L2 device (/dev/videoN or an index), video file, rtsp/http(s) URL, "
        "or a GStreamer pipeline ending in appsink.",
    )
    id: str | None = Field(
        None, description="Camera id used in messages, logs and metrics; defaults to the source's name."
    )
    kind: Literal["auto", "v4l2", "file", "url", "gstreamer"] = Field(
        "auto", description="Source kind; 'auto' infers it from the source string."
    )
    loop: bool = Field(False, description="Restart a video file at its end instead of exiting.")
    realtime: bool = Field(
        False,
        description="Pace a video file at its own frame rate, as a live camera would deliver it "
        "(frames the model cannot keep up with are dropped). Off: every frame is processed.",
    )
    fourcc: str | None = Field(None, description="V4L2 pixel format to request, e.g. 'MJPG'.")
    width: int | None = Field(None, gt=0, description="Requested capture width in pixels.")
    height: int | None = Field(None, gt=0, description="Requested capture height in pixels.")
    fps: float | None = Field(None, gt=0, description="Requested capture frame rate.")
    open_timeout_s: float = Field(10.0, gt=0, description="Timeout for opening a network stream.")
    read_timeout_s: float = Field(5.0, gt=0, description="Timeout for one read from a network stream.")
    stall_timeout_s: float = Field(
        5.0, gt=0, description="A live source that delivers no new frame for this long is reopened."
    )
    backoff_initial_s: float = Field(0.5, gt=0, description="First reconnect delay; doubles per failure.")
    backoff_max_s: float = Field(30.0, gt=0, description="Upper bound of the reconnect delay.")
    max_frame_age_s: float = Field(
        1.0,
        gt=0,
        description="A live frame that arrives this much later than its stream timestamp says (a frozen "
        "stream's buffer) is stale: dropped, counted, and not progress. Capped at stall_timeout_s / 2.",
    )
    max_read_failures: int = Field(
        25, ge=1, description="Consecutive unreadable frames a video file skips before it counts as ended."
    )
    max_frame_width: int = Field(
        1920, ge=64, description="Larger frames are downscaled (aspect kept) at capture, bounding memory."
    )
    max_frame_height: int = Field(
        1080, ge=64, description="Larger frames are downscaled (aspect kept) at capture, bounding memory."
    )

    @field_validator("fourcc")
    @classmethod
    def _four_chars(cls, v: str | None) -> str | None:
        if v is not None and len(v) != 4:
            raise ValueError(f"a FOURCC has exactly 4 characters, got {v!r}")
        return v

    @property
    def frame_age_limit_s(self) -> float:
        """max_frame_age_s, capped at half the stall timeout so stale frames can never hide a stall."""
        return min(self.max_frame_age_s, self.stall_timeout_s / 2)


class ModelConfig(_Section):
    bundle: Path = Field(Path("models/reference"), description="Model bundle directory (manifest.json, model, bank).")
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime intra-op threads; 0: chosen by measurement at start-up (1 to the cores)."
    )
    spinning: Literal["auto", "on", "off"] = Field(
        "auto", description="Busy-waiting intra-op threads; 'auto': chosen by measurement at start-up."
    )
    variant: str | None = Field(
        None, description="Bundle variant to run (e.g. 'int8'); unset: the fastest, timed at start-up."
    )
    tune_budget_s: float = Field(
        3.0, ge=0, le=30, description="Most start-up time spent timing variants, threads and spinning; 0: no timing."
    )
    warmup_runs: int = Field(3, ge=1, description="Inference runs before the daemon reports ready.")
    signing_public_key: Path | None = Field(
        None, description="Ed25519 public key (PEM); when set, only bundles signed with its private key load."
    )


class LabelsConfig(_Section):
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Per-label probability thresholds overriding the manifest, keyed 'group.label'.",
    )
    smoothing_alpha: float = Field(
        1.0,
        gt=0,
        le=1,
        description="EMA weight of the newest frame's probabilities; 1.0 disables smoothing.",
    )
    hysteresis: float = Field(
        0.0, ge=0, lt=1, description="A tag that is on turns off only below threshold - hysteresis."
    )

    @field_validator("thresholds")
    @classmethod
    def _threshold_keys(cls, v: dict[str, float]) -> dict[str, float]:
        for key, value in v.items():
            if key.count(".") != 1:
                raise ValueError(f"threshold key {key!r} must be 'group.label'")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold for {key!r} must be within [0, 1], got {value}")
        return v


class RegionsConfig(_Section):
    """Where active tags are: boxes from the model's per-cell embeddings (bundles with a dense output)."""

    enabled: bool = Field(True, description="Publish regions when the bundle's model has per-cell output.")
    threshold: float = Field(
        0.5, gt=0, le=1, description="A cell belongs to a label's region at this probability within its group."
    )
    max_labels: int = Field(
        4, ge=1, le=64, description="Regions for at most this many active tags per frame (the best-scoring first)."
    )
    max_boxes: int = Field(8, ge=1, le=64, description="At most this many boxes per label, the best-scoring first.")
    labels: list[str] | None = Field(
        None,
        description="'group.label' tags that get regions, overriding the bundle's 'localize' marks; unset: the "
        "bundle's marks.",
    )

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, v: list[str] | None) -> list[str] | None:
        for key in v or []:
            if not re.match(_TAG_KEY, key):
                raise ValueError(f"label {key!r} must be 'group.label'")
        return v


class CurveConfig(_Section):
    server_secret_key: Path = Field(
        description="The daemon's CURVE certificate with its secret key (name.key_secret from 'retrofit-agent keys curve')."
    )
    authorized_keys_dir: Path = Field(
        description="Directory of subscribers' public certificates (*.key); only these may connect."
    )


class PublishConfig(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ PUB bind endpoint (tcp:// or ipc://).")
    send_hwm: int = Field(100, ge=1, description="Messages queued per subscriber before ZeroMQ drops new ones.")
    linger_ms: int = Field(0, ge=0, description="How long close() waits to flush queued messages.")
    status_interval_s: float = Field(
        2.0, gt=0, description="Period of the 'status' message that late subscribers catch up with."
    )
    curve: CurveConfig | None = Field(
        None, description="ZeroMQ CURVE encryption and client authentication; unset publishes in the clear."
    )
    vehicle: str | None = Field(
        None,
        pattern=VEHICLE_PATTERN,
        description="Vehicle id in every message (letters, digits, '.', '_', '-'; at most 64); unset: the host name.",
    )
    replay: bool = Field(
        True,
        description="Keep the latest messages of each topic and hand a missed stretch to a subscriber that asks "
        "(the uplink, after a restart or a gap in seq).",
    )
    replay_endpoint: str | None = Field(
        None,
        description="ZeroMQ REP endpoint of the replay; unset: the publish endpoint's next TCP port, or its IPC "
        "path plus '.replay'.",
    )
    replay_bytes_per_topic: int = Field(
        2_000_000,
        ge=10_000,
        le=64_000_000,
        description="Memory kept per topic for replay (about 3 min of tags at 15 fps with the default).",
    )

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _transport(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("inproc://"):
            raise ValueError("inproc:// is reachable only inside the daemon's process; use tcp:// or ipc://")
        if v.startswith("ipc://"):
            if len(v) == len("ipc://"):
                raise ValueError("ipc:// needs a socket path")
            return v
        if not v.startswith("tcp://"):
            raise ValueError(f"endpoint must start with tcp:// or ipc://, got {v!r}")
        host, sep, port = v[len("tcp://") :].rpartition(":")
        if not sep or not host:
            raise ValueError(f"a tcp endpoint is tcp://HOST:PORT, got {v!r}")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"the port of {v!r} must be within 1-65535")
        return v

    @model_validator(mode="after")
    def _replay_address(self) -> PublishConfig:
        if self.replay and self.replay_endpoint is None:
            try:
                replay_endpoint_for(self.endpoint)
            except ValueError as e:
                raise ValueError(f"replay_endpoint: {e}") from None
        if self.replay and self.replay_endpoint == self.endpoint:
            raise ValueError("replay_endpoint must differ from endpoint")
        return self

    @property
    def replay_address(self) -> str:
        return self.replay_endpoint or replay_endpoint_for(self.endpoint)


class MetricsConfig(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics over HTTP.")
    address: str = Field("127.0.0.1:9108", description="host:port of the /metrics endpoint; port 0 picks a free one.")

    @field_validator("address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address must be host:port, got {v!r}")
        if int(port) > 65535:
            raise ValueError(f"the port of {v!r} must be within 0-65535 (0 picks a free one)")
        return v

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


_CAMPAIGN_NAME = r"^[A-Za-z0-9_\-]+$"


class RegionRule(_Section):
    """A box the frame must hold: one of the label's regions whose centre and size fit."""

    label: str = Field(pattern=_TAG_KEY, description="'group.label' of a localized label.")
    centre_x: tuple[float, float] = Field(
        (0.0, 1.0), description="[low, high] of the box centre's x, as a fraction of the frame's width (0: left)."
    )
    centre_y: tuple[float, float] = Field(
        (0.0, 1.0), description="[low, high] of the box centre's y, as a fraction of the frame's height (0: top)."
    )
    min_area: float = Field(0.0, ge=0, le=1, description="Smallest box area, as a fraction of the frame's area.")

    @field_validator("centre_x", "centre_y")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        low, high = v
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError("must be [low, high] with 0 <= low <= high <= 1")
        return v


class CampaignRule(_Section):
    """When a frame is worth keeping: a condition over the tags that are on, and where one of them is."""

    any_of: list[str] = Field(
        default_factory=list, description="At least one of these 'group.label' tags is on (empty: no constraint)."
    )
    all_of: list[str] = Field(default_factory=list, description="Every one of these tags is on.")
    none_of: list[str] = Field(default_factory=list, description="None of these tags is on.")
    min_score: float = Field(
        0.0, ge=0, le=1, description="any_of/all_of tags count only with at least this probability."
    )
    min_duration_s: float = Field(
        0.0, ge=0, description="The condition must hold this long, continuously, before a capture."
    )
    region: RegionRule | None = Field(
        None, description="A box of this label must satisfy the rule (needs a bundle with regions)."
    )

    @field_validator("any_of", "all_of", "none_of")
    @classmethod
    def _tag_keys(cls, v: list[str]) -> list[str]:
        for key in v:
            if not re.match(_TAG_KEY, key):
                raise ValueError(f"tag {key!r} must be 'group.label'")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> CampaignRule:
        if not self.any_of and not self.all_of and self.region is None:
            raise ValueError("a rule needs any_of, all_of or region (none_of alone would match almost every frame)")
        return self

    @property
    def keys(self) -> set[str]:
        region = {self.region.label} if self.region is not None else set()
        return {*self.any_of, *self.all_of, *self.none_of, *region}


class CampaignConfig(_Section):
    name: str = Field(pattern=_CAMPAIGN_NAME, description="Campaign name; also its directory in the store.")
    rule: CampaignRule = Field(description="Which frames to keep.")
    min_interval_s: float = Field(10.0, ge=0, description="At least this long between two triggers.")
    max_per_hour: int = Field(60, ge=1, description="At most this many triggers in any rolling hour.")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of saved frames.")
    max_width: int | None = Field(
        None, gt=0, description="Downscale saved frames to at most this width; unset keeps the full frame."
    )
    frames_before: int = Field(0, ge=0, le=30, description="Processed frames before the trigger to keep too.")
    frames_after: int = Field(0, ge=0, le=30, description="Processed frames after the trigger to keep too.")


class StoreConfig(_Section):
    directory: Path = Field(
        Path("/var/lib/retrofit-agent/captures"), description="Where captures are saved (one folder per campaign)."
    )
    max_bytes: int = Field(2 * 1024**3, gt=0, description="Cap on the store's size; oldest captures go first.")
    max_files: int = Field(20_000, gt=0, description="Cap on the number of saved frames (image + sidecar pairs).")
    queue_size: int = Field(
        64, ge=1, description="Frames waiting for the writer thread; beyond it captures are skipped and counted."
    )
    queue_max_bytes: int = Field(
        64 * 1024**2,
        ge=1024**2,
        description="Bytes of frames waiting for the writer thread; beyond it captures are skipped and counted.",
    )
    ring_max_bytes: int = Field(
        32 * 1024**2,
        ge=1024**2,
        description="Bytes of the pre-trigger ring (frames kept JPEG-encoded for frames_before); past it the "
        "oldest go first.",
    )
    disk_full_retry_s: float = Field(5.0, gt=0, description="While the disk is full, how often to try writing again.")
    rescan_interval_s: float = Field(
        30.0, gt=0, description="How often the store re-reads its size from disk (an uploader deletes files)."
    )


class CollectConfig(_Section):
    campaigns: list[CampaignConfig] = Field(default_factory=list, description="Tag-triggered image collection.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="The on-disk capture store.")

    @field_validator("campaigns")
    @classmethod
    def _unique(cls, v: list[CampaignConfig]) -> list[CampaignConfig]:
        names = [c.name for c in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"campaign names must be unique, {sorted(dup)[0]!r} repeats")
        return v


class LogConfig(_Section):
    format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="'json' lines for journald, 'console' for humans; 'auto': console when stderr is a "
        "terminal, json otherwise.",
    )
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Minimum log level.")


class LimitsConfig(_Section):
    memory_mb: int | None = Field(
        None,
        gt=0,
        description="Memory the daemon may use; the config is refused at start-up if its frame buffers cannot "
        "fit. Unset: the service's cgroup limit (the unit's MemoryMax), or no check outside one.",
    )


class BudgetConfig(_Section):
    """How much of the car's CPU the model may take, and how it backs off when the SoC runs hot."""

    max_fps: float | None = Field(None, gt=0, description="Most inferences per second; unset: as fast as frames come.")
    max_cpu: float | None = Field(
        None, gt=0, description="Most CPU the process may use, in cores (e.g. 0.5), averaged over cpu_window_s."
    )
    cpu_window_s: float = Field(5.0, ge=1, le=60, description="Window the process CPU use is averaged over.")
    thermal_zone: str = Field(
        "auto",
        description="Temperature file in millidegrees C; 'auto': /sys/class/thermal/thermal_zone0/temp "
        "where it exists; 'off': no thermal budget.",
    )
    thermal_high_c: float = Field(80.0, description="Above it the model's rate is lowered stepwise.")
    thermal_critical_c: float = Field(90.0, description="Above it the model runs at thermal_floor_fps.")
    thermal_hysteresis_c: float = Field(5.0, ge=0, description="Recovery starts below thermal_high_c minus this.")
    thermal_floor_fps: float = Field(1.0, gt=0, description="Rate at or above critical temperature.")
    thermal_step: float = Field(0.7, gt=0, lt=1, description="Rate factor applied per poll while above high.")
    thermal_poll_s: float = Field(1.0, gt=0, le=10, description="How often the temperature is read.")

    @model_validator(mode="after")
    def _ordered(self) -> BudgetConfig:
        if self.thermal_critical_c <= self.thermal_high_c:
            raise ValueError(
                f"thermal_critical_c ({self.thermal_critical_c}) must be above thermal_high_c ({self.thermal_high_c})"
            )
        return self


class AgentConfig(_Section):
    camera: CameraConfig = Field(default_factory=CameraConfig, description="Frame source.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model bundle and runtime.")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="Zero-shot tagging.")
    regions: RegionsConfig = Field(default_factory=RegionsConfig, description="Boxes for active tags.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="ZeroMQ publishing.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    collect: CollectConfig = Field(default_factory=CollectConfig, description="Image collection campaigns.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Resource budgets checked at start-up.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="CPU and thermal budgets of the model.")
    max_frames: int | None = Field(None, gt=0, description="Stop after this many processed frames (demos, tests).")


# --------------------------------------------------------------------------- loading


def load_config(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the config from file < environment < flags.

    ``flags`` are dotted paths to values (``{"camera.source": "/dev/video2"}``); ``None``
    values mean "flag not given" and are skipped.
    """
    environ = {} if environ is None else environ
    if config_file is None and environ.get(ENV_CONFIG_FILE):
        config_file = Path(environ[ENV_CONFIG_FILE])
    file_origin = f"config ({config_file})" if config_file else "config"
    flag_tree: dict[str, Any] = {}
    for dotted, value in (flags or {}).items():
        if value is not None:
            set_path(flag_tree, dotted.split("."), value, origin=f"--{dotted}")
    layers = [
        (file_origin, read_toml(config_file) if config_file is not None else {}),
        ("environment", env_overrides(environ, ENV_PREFIX, skip=(ENV_CONFIG_FILE,))),
        ("flags", flag_tree),
    ]
    data: dict[str, Any] = {}
    for _, tree in layers:
        data = deep_merge(data, tree)
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, file_origin)) from None
    _check_shadowed_values(layers)
    return cfg


def _paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for key, value in tree.items():
        path = (*prefix, str(key))
        out.add(path)
        if isinstance(value, Mapping):
            out |= _paths(value, path)
    return out


def _check_shadowed_values(layers: list[tuple[str, dict[str, Any]]]) -> None:
    """An invalid value is an error even when a later source overrides it.

    The merged config can be valid only because a flag replaced a bad file or environment
    value; that bad value would bite the day the flag is dropped, so it is refused now.
    Each source is validated on top of the ones before it; only errors at paths that a
    later source overrides are reported (the rest the merged validation already judged).
    """
    data: dict[str, Any] = {}
    for i, (origin, tree) in enumerate(layers[:-1]):
        data = deep_merge(data, tree)
        later = set().union(*(_paths(t) for _, t in layers[i + 1 :]))
        if not tree or not later:
            continue
        try:
            AgentConfig.model_validate(data)
        except ValidationError as e:
            for err in e.errors():
                loc = tuple(str(x) for x in err["loc"])
                shadowed = any(loc[: len(p)] == p or p[: len(loc)] == loc for p in later)
                if err["type"] != "missing" and shadowed:
                    single = ValidationError.from_exception_data(e.title, [err])  # type: ignore[list-item]
                    raise ConfigError(
                        format_validation_error(single, origin) + " (overridden, but still invalid)"
                    ) from None
