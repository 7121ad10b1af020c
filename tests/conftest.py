"""Shared fixtures: the committed seeded bundle, generated clips, a daemon runner.

Plain helpers live in ``helpers.py``; import them from there, never from this file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from helpers import REPO, SEEDED, RunningAgent, agent_command, free_port


@pytest.fixture(scope="session")
def seeded_bundle() -> Path:
    """The seeded, untrained bundle (tests/fixtures/seeded-bundle): mechanics, not labels."""
    return SEEDED


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-frame synthetic driving clip written by the repo's own generator."""
    from retrofit_agent.contract.sample import write_clip

    return write_clip(tmp_path_factory.mktemp("clips") / "drive40.mp4", n_frames=40, fps=15.0)


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    """A writable copy of the seeded bundle, for tampering."""
    dst = tmp_path / "bundle"
    shutil.copytree(SEEDED, dst)
    return dst


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator:
    started: list[RunningAgent] = []

    def _start(*args: str, env: dict[str, str] | None = None) -> RunningAgent:
        endpoint = f"ipc://{tmp_path}/agent-{len(started)}.sock"
        port = free_port()
        log_path = tmp_path / f"agent-{len(started)}.log"
        cmd = agent_command(
            "--publish", endpoint, "--metrics-address", f"127.0.0.1:{port}", "--log-format", "json", *args
        )
        full_env = {**os.environ, **(env or {})}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=full_env)
        agent = RunningAgent(proc, endpoint, port, log_path)
        started.append(agent)
        return agent

    yield _start
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()


@pytest.fixture
def subscriber() -> Iterator:
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def _connect(endpoint: str, topics: tuple[str, ...] = ("",)) -> zmq.Socket:
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        for t in topics:
            s.setsockopt(zmq.SUBSCRIBE, t.encode())
        s.connect(endpoint)
        socks.append(s)
        return s

    yield _connect
    for s in socks:
        s.close()
    ctx.term()
