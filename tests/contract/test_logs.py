"""Log format: console for a person at a terminal, JSON lines for journald and pipes."""

import io
import json
import os

import pytest
import structlog

from retrofit_agent.contract.logs import configure_logging, resolve_format
from retrofit_agent.daemon.config import AgentConfig


@pytest.fixture
def terminal():
    main, other = os.openpty()
    stream = os.fdopen(main, "w")
    yield stream
    stream.close()
    os.close(other)


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


def test_auto_is_console_on_a_terminal_and_json_otherwise(terminal):
    assert resolve_format("auto", terminal) == "console"
    assert resolve_format("auto", io.StringIO()) == "json"


def test_an_explicit_format_wins(terminal):
    assert resolve_format("json", terminal) == "json"
    assert resolve_format("console", io.StringIO()) == "console"


def test_daemon_default_is_auto():
    assert AgentConfig().log.format == "auto"


def test_auto_into_a_pipe_writes_json_lines():
    out = io.StringIO()
    configure_logging("auto", "info", out)
    structlog.get_logger().info("camera_reconnected", camera="front")
    record = json.loads(out.getvalue())
    assert record["event"] == "camera_reconnected" and record["camera"] == "front"


def test_console_writes_a_readable_line():
    out = io.StringIO()
    configure_logging("console", "info", out)
    structlog.get_logger().info("camera_reconnected", camera="front")
    line = out.getvalue().strip()
    assert "camera_reconnected" in line and "camera=front" in line and not line.startswith("{")
