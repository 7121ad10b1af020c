"""Settings I/O shared by every program: TOML files, dotted and environment overrides, and
pydantic validation errors turned into one line.

The daemon's config, the toolchain's config and the prompts file all read through here, so
a bad file reads the same everywhere: one line naming the file, the field and the value.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from retrofit_agent.contract.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file, turning every failure into a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


M = TypeVar("M", bound=BaseModel)


def load_settings(model: type[M], path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> M:
    """Defaults < TOML file < overrides, validated by ``model``; every failure is a one-line ConfigError."""
    data = read_toml(path) if path is not None else {}
    data = deep_merge(data, overrides or {})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        origin = f"config ({path.name})" if path is not None else "config"
        raise ConfigError(format_validation_error(e, origin)) from None


def env_overrides(environ: Mapping[str, str], prefix: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested overrides from ``<prefix>SECTION__FIELD`` variables (e.g. ``RETROFIT_CAMERA__SOURCE``).

    Values stay strings (pydantic coerces them) except JSON objects and lists, which are
    decoded so that e.g. ``RETROFIT_LABELS__THRESHOLDS='{"weather.rain": 0.6}'`` works.
    """
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(prefix) or name in skip:
            continue
        path = [p.lower() for p in name[len(prefix) :].split("__")]
        if value.lstrip().startswith(("{", "[")):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{name}: not valid JSON: {e}") from None
        set_path(out, path, value, origin=name)
    return out


def set_path(tree: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = tree
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(path)} conflicts with a scalar setting")
        node = child
    node[path[-1]] = value


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(err: ValidationError, origin: str = "config", limit: int = 5) -> str:
    """One line naming each offending field and value, up to ``limit`` of them.

    ``config error: camera.fps: Input should be greater than 0 (got -1); and: log.level: Input
    should be 'debug', … (got 'loud'); and 3 more``.
    """
    errors = err.errors()
    parts = [_describe(e) for e in errors[:limit]]
    line = f"{origin} error: {parts[0]}"
    if len(parts) > 1:
        line += "; and: " + "; ".join(parts[1:])
    if len(errors) > limit:
        line += f"; and {len(errors) - limit} more"
    return line


def _describe(error: Any) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "<root>"
    msg = "unknown setting" if error["type"] == "extra_forbidden" else error["msg"]
    part = f"{loc}: {msg}"
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], dict):
        part += f" (got {error['input']!r})"
    return part.replace("\r", " ").replace("\n", " ")  # one line, whatever a validator's message held
