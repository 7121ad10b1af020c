"""The frame loop in-process, with real components: seeded bundle, real grabber, real PUB."""

import time
from pathlib import Path

import numpy as np
import structlog
from prometheus_client import CollectorRegistry

from helpers import receive
from retrofit_agent.contract.sample import render_frame
from retrofit_agent.daemon.agent import Agent, AgentIO, LoopSettings
from retrofit_agent.daemon.capture import FrameGrabber
from retrofit_agent.daemon.config import AgentConfig
from retrofit_agent.daemon.lifecycle import StopSignal, SystemdNotifier
from retrofit_agent.daemon.metrics import AgentMetrics
from retrofit_agent.daemon.outputs import Outputs
from retrofit_agent.daemon.pipeline import build_pipeline
from retrofit_agent.daemon.publish import Publisher


class ListSource:
    """A capture that plays a fixed list of frames (what a misbehaving driver might return)."""

    def __init__(self, frames):
        self.frames = list(frames)

    def read(self):
        if not self.frames:
            return False, None
        return True, self.frames.pop(0)

    def release(self):
        pass

    def get(self, prop):
        return 0.0


def make_agent(tmp_path: Path, frames, seeded_bundle: Path):
    cfg = AgentConfig.model_validate(
        {
            "camera": {"source": "list", "kind": "file"},
            "model": {"bundle": str(seeded_bundle), "intra_op_threads": 1, "warmup_runs": 1},
            "publish": {"endpoint": f"ipc://{tmp_path}/a.sock"},
        }
    )
    metrics = AgentMetrics.create(CollectorRegistry())
    pipeline = build_pipeline(cfg, structlog.get_logger())
    grabber = FrameGrabber(cfg.camera, metrics, opener=lambda c: ListSource(frames))
    grabber.set_preparer(pipeline.prepare, pipeline.generation)
    publisher = Publisher(cfg.publish, metrics)
    io = AgentIO(grabber, Outputs(publisher, "test"), metrics, SystemdNotifier({}), StopSignal())
    agent = Agent(LoopSettings(), pipeline, io)
    return agent, metrics


def run_to_end(agent: Agent) -> list[dict]:
    """Run the frame loop until the source ends; returns the captured log events."""
    agent.grabber.start()
    try:
        with structlog.testing.capture_logs() as logs:
            assert agent.run() == 0
    finally:
        agent.grabber.stop()
        agent.outputs.publisher.close()
    return logs


def value(metrics: AgentMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels or None)


def test_bad_frames_are_converted_or_rejected_and_counted(tmp_path, seeded_bundle, subscriber):
    good = render_frame(1)
    frames = [
        good,
        np.zeros((0, 0, 3), np.uint8),  # empty: rejected
        good[:, :, 0],  # grayscale: converted
        good.astype(np.uint16) << 8,  # 16-bit: converted
        np.dstack([good, np.full(good.shape[:2], 255, np.uint8)]),  # BGRA: converted
        np.zeros((4, 4, 2), np.uint8),  # 2 channels: rejected
        np.zeros((4320, 7680, 3), np.uint8),  # 8K: resized
        good,
    ]
    agent, metrics = make_agent(tmp_path, frames, seeded_bundle)
    sub = subscriber(agent.outputs.publisher.endpoint, ("tags",))
    time.sleep(0.3)  # let the subscription reach the PUB socket before the first frame
    logs = run_to_end(agent)
    assert value(metrics, "retrofit_frames_processed_total") == 6
    assert value(metrics, "retrofit_frames_failed_total", reason="bad_frame") == 2
    assert [l["frame_id"] for l in logs if l["event"] == "bad_frame"] == [1, 5]
    msgs = receive(sub, 0.5)
    assert [m["frame_id"] for _, m in msgs] == [0, 2, 3, 4, 6, 7]
    assert [m["seq"] for _, m in msgs] == list(range(6))  # rejected frames leave no gap in seq


class FlakySession:
    """Wraps the real onnxruntime session; raises on the n-th call."""

    def __init__(self, session, fail_on: int):
        self.session, self.fail_on, self.calls = session, fail_on, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("onnxruntime: simulated kernel failure")
        return self.session.run(*args, **kwargs)


def test_inference_failure_is_logged_counted_and_skipped(tmp_path, seeded_bundle):
    agent, metrics = make_agent(tmp_path, [render_frame(i) for i in range(4)], seeded_bundle)
    emb = agent.pipeline.embedder
    emb.session = FlakySession(emb.session, fail_on=2)
    logs = run_to_end(agent)
    assert value(metrics, "retrofit_frames_processed_total") == 3
    assert value(metrics, "retrofit_frames_failed_total", reason="inference_error") == 1
    failed = [l for l in logs if l["event"] == "inference_failed"]
    assert failed[0]["frame_id"] == 1 and "simulated kernel failure" in failed[0]["error"]
