"""The uplink's configuration: one validated pydantic model, read like the daemon's.

Sources, lowest precedence first: defaults, a TOML file (``--config`` or
``$RETROFIT_UPLINK_CONFIG``), environment variables ``RETROFIT_UPLINK_<SECTION>__<KEY>`` (e.g.
``RETROFIT_UPLINK_MQTT__PASSWORD``), command-line flags. Validators are pure: files (journal,
TLS) are checked by the composition root at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.messages import VEHICLE_PATTERN
from retrofit_agent.contract.settings import deep_merge, env_overrides, format_validation_error, read_toml, set_path
from retrofit_agent.daemon.config import MetricsConfig as DaemonMetricsConfig
from retrofit_agent.daemon.replay import replay_endpoint_for

ENV_PREFIX = "RETROFIT_UPLINK_"
ENV_CONFIG_FILE = "RETROFIT_UPLINK_CONFIG"
_TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9_.\-]+$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Topic = Literal["tags", "events", "status", "captures"]
ALL_TOPICS: tuple[Topic, ...] = ("tags", "events", "status", "captures")


class InputConfig(_Section):
    endpoint: str = Field(
        "tcp://127.0.0.1:5556", description="The daemon's ZeroMQ PUB endpoint (its publish.endpoint)."
    )
    topics: list[Topic] = Field(
        default_factory=lambda: list(ALL_TOPICS),
        description="Topics to take from the daemon.",
    )
    tags: Literal["all", "every_n", "changes"] = Field(
        "changes",
        description="Which tags messages to keep: all, every Nth (tags_every_n, by seq) or changes only (the set of "
        "tags that are on differs from the last one kept).",
    )
    tags_every_n: int = Field(15, ge=1, description="N for tags = 'every_n'.")
    curve_client_cert: Path | None = Field(None, description="This subscriber's CURVE certificate (.key_secret).")
    curve_server_key: Path | None = Field(None, description="The daemon's public CURVE certificate (.key).")
    receive_hwm: int = Field(10_000, ge=100, description="Messages ZeroMQ queues for the uplink before dropping.")
    replay: bool = Field(
        True,
        description="Ask the daemon for what a gap in seq missed (its publish.replay): after a restart of the "
        "uplink, at its first start, or when its queue overflowed.",
    )
    replay_endpoint: str | None = Field(
        None,
        description="The daemon's replay endpoint (its publish.replay_endpoint); unset: derived from endpoint as "
        "the daemon derives it.",
    )
    replay_timeout_ms: int = Field(
        1000, ge=50, le=30_000, description="How long to wait for a replay before counting the gap as lost."
    )

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("tcp://", "ipc://")) or len(v) <= len("ipc://"):
            raise ValueError(f"endpoint must be tcp://HOST:PORT or ipc://PATH, got {v!r}")
        return v

    @model_validator(mode="after")
    def _curve_pair(self) -> InputConfig:
        if (self.curve_client_cert is None) != (self.curve_server_key is None):
            raise ValueError("curve_client_cert and curve_server_key go together")
        if self.replay and self.replay_endpoint is None:
            try:
                replay_endpoint_for(self.endpoint)
            except ValueError as e:
                raise ValueError(f"replay_endpoint: {e}") from None
        return self

    @property
    def replay_address(self) -> str:
        return self.replay_endpoint or replay_endpoint_for(self.endpoint)


class JournalConfig(_Section):
    directory: Path = Field(
        Path("/var/lib/retrofit-uplink/journal"), description="Directory of the on-vehicle journal (SQLite, WAL)."
    )
    max_bytes: int = Field(
        256 * 1024**2, ge=1024**2, description="Cap on the journal's message bytes; past it the oldest go first."
    )
    max_age_s: float = Field(7 * 86400.0, gt=0, description="Messages older than this are dropped, oldest first.")
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode: 'full' fsyncs every commit (a message survives power loss once "
        "journaled); 'normal' survives a crash of the uplink but may lose the last commits on power loss.",
    )


class MqttConfig(_Section):
    url: str = Field("mqtt://127.0.0.1:1883", description="Broker: mqtt://HOST:PORT or mqtts://HOST:PORT (TLS).")
    client_id: str | None = Field(None, description="MQTT client id; unset: retrofit-uplink-<vehicle>.")
    username: str | None = Field(None, description="Username, if the broker asks for one.")
    password: SecretStr | None = Field(None, description="Password (prefer password_file or the environment).")
    password_file: Path | None = Field(None, description="File holding the password (first line).")
    ca_file: Path | None = Field(None, description="CA certificate(s) to verify the broker (mqtts); unset: system CAs.")
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for TLS client authentication.")
    key_file: Path | None = Field(None, description="Client certificate's private key (PEM).")
    topic_prefix: str = Field("retrofit", description="First topic levels: <prefix>/<vehicle>/<camera>/<topic>.")
    keepalive_s: int = Field(30, ge=5, description="MQTT keep-alive; a dead link is noticed within 1.5x this.")
    inflight: int = Field(64, ge=1, le=65535, description="Messages published and not yet acknowledged (PUBACK).")
    backlog_rate: float = Field(
        2000.0, gt=0, description="Messages per second the backlog may use while draining; live ones go first."
    )
    backoff_initial_s: float = Field(0.5, gt=0, description="First reconnect delay; doubles per failure.")
    backoff_max_s: float = Field(30.0, gt=0, description="Upper bound of the reconnect delay.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"expected mqtt://HOST:PORT or mqtts://HOST:PORT, got {v!r}")
        try:
            _ = parts.port  # urlsplit raises ValueError here for a port out of range
        except ValueError:
            raise ValueError(f"the port of {v!r} must be within 1-65535") from None
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        levels = v.split("/")
        if v.startswith("$") or not all(_TOPIC_LEVEL.match(level) for level in levels):
            raise ValueError(
                f"topic prefix {v!r} must be '/'-separated levels of letters, digits, '.', '_' or '-' "
                "(no wildcards '+'/'#', no empty level, not starting with '$')"
            )
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> MqttConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)


class S3Config(_Section):
    endpoint: str = Field(description="Object store URL, http(s)://HOST[:PORT] (path-style requests).")
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$", description="Bucket (must exist).")
    prefix: str = Field("captures", description="Key prefix: <prefix>/<vehicle>/<campaign>/<date>/<file>.")
    region: str = Field("us-east-1", description="SigV4 signing region.")
    access_key_id: str = Field(description="Access key id.")
    secret_access_key: SecretStr | None = Field(None, description="Secret key (prefer secret_access_key_file).")
    secret_access_key_file: Path | None = Field(None, description="File holding the secret key (first line).")
    part_size: int = Field(8 * 1024**2, ge=5 * 1024**2, description="Multipart part size (S3's minimum is 5 MiB).")
    multipart_threshold: int = Field(
        8 * 1024**2, ge=5 * 1024**2, description="Files at least this big go up in parts (resumable after a crash)."
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one HTTP request.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"expected http(s)://HOST[:PORT], got {v!r}")
        return v.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not all(_TOPIC_LEVEL.match(p) for p in v.split("/")):
            raise ValueError(f"key prefix {v!r} must be '/'-separated parts of letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _secret(self) -> S3Config:
        if (self.secret_access_key is None) == (self.secret_access_key_file is None):
            raise ValueError("give exactly one of secret_access_key and secret_access_key_file")
        return self


class CapturesConfig(_Section):
    directory: Path | None = Field(
        None, description="The daemon's capture store (its collect.store.directory); unset: captures stay on board."
    )
    max_bytes_per_s: int = Field(2 * 1024**2, ge=0, description="Bandwidth cap for uploads, bytes/s; 0: no cap.")
    mqtt_max_bytes: int = Field(
        128 * 1024,
        ge=0,
        description="Without an object store, captures whose JPEG is at most this size go over MQTT; 0: never.",
    )
    rescan_interval_s: float = Field(10.0, gt=0, description="How often the store is scanned for pairs to upload.")
    retry_s: float = Field(5.0, gt=0, description="Wait after a failed upload before the next try.")


class MetricsConfig(DaemonMetricsConfig):
    """The daemon's metrics settings, on the uplink's own port."""

    enabled: bool = Field(True, description="Serve the uplink's Prometheus metrics over HTTP.")
    address: str = Field("127.0.0.1:9109", description="host:port of /metrics; port 0 picks a free one.")


class LogConfig(_Section):
    format: Literal["auto", "json", "console"] = Field("auto", description="'json', 'console' or 'auto'.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Minimum log level.")


class UplinkConfig(_Section):
    vehicle: str | None = Field(
        None, pattern=VEHICLE_PATTERN, description="Vehicle id in topics and object keys; unset: the host name."
    )
    input: InputConfig = Field(default_factory=InputConfig, description="The daemon's messages.")
    journal: JournalConfig = Field(default_factory=JournalConfig, description="The durable on-vehicle journal.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="The broker messages are forwarded to.")
    s3: S3Config | None = Field(None, description="Object store for captured images; unset: MQTT fallback.")
    captures: CapturesConfig = Field(default_factory=CapturesConfig, description="Captured images.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")


def load_uplink_config(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> UplinkConfig:
    """File < environment < flags (dotted paths; None means not given). Raises ConfigError (one line)."""
    environ = {} if environ is None else environ
    if config_file is None and environ.get(ENV_CONFIG_FILE):
        config_file = Path(environ[ENV_CONFIG_FILE])
    origin = f"config ({config_file})" if config_file else "config"
    flag_tree: dict[str, Any] = {}
    for dotted, value in (flags or {}).items():
        if value is not None:
            set_path(flag_tree, dotted.split("."), value, origin=f"--{dotted}")
    data = read_toml(config_file) if config_file is not None else {}
    data = deep_merge(data, env_overrides(environ, ENV_PREFIX, skip=(ENV_CONFIG_FILE,)))
    data = deep_merge(data, flag_tree)
    try:
        return UplinkConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None


def read_secret(value: SecretStr | None, path: Path | None, what: str) -> str | None:
    """A secret given inline or in a file (first line); ConfigError naming the file if unreadable."""
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror or e}") from None
