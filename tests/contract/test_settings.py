"""One-line validation errors list every problem, up to five, so one fix-and-retry round does."""

import pytest
from pydantic import ValidationError

from retrofit_agent.contract.settings import format_validation_error
from retrofit_agent.daemon.config import AgentConfig


def _error(tree: dict) -> ValidationError:
    with pytest.raises(ValidationError) as e:
        AgentConfig.model_validate(tree)
    return e.value


def test_one_error_is_one_clause():
    line = format_validation_error(_error({"camera": {"fps": -1}}), "config (agent.toml)")
    assert line == "config (agent.toml) error: camera.fps: Input should be greater than 0 (got -1)"


def test_several_errors_are_all_named_on_one_line():
    line = format_validation_error(_error({"camera": {"fps": -1}, "log": {"level": "loud"}, "max_frames": 0}))
    assert "\n" not in line
    assert line.startswith("config error: camera.fps: Input should be greater than 0 (got -1); and: ")
    assert "log.level: Input should be 'debug', 'info', 'warning' or 'error' (got 'loud')" in line
    assert "max_frames: Input should be greater than 0 (got 0)" in line
    assert "more" not in line


def test_beyond_five_errors_the_rest_are_counted():
    tree = {"camera": {"fps": -1}, "max_frames": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    line = format_validation_error(_error(tree))
    assert line.count(": unknown setting") + line.count("greater than 0") == 5
    assert line.endswith("; and 2 more")
