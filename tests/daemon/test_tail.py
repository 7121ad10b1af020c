import io
import threading
import time

import pytest
import zmq

from retrofit_agent.contract.messages import Latency, StatusMessage, TagOut, TagsMessage
from retrofit_agent.daemon.tail import tail


@pytest.mark.integration
def test_tail_prints_messages_from_a_real_publisher(tmp_path):
    endpoint = f"ipc://{tmp_path}/pub.sock"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)
    out = io.StringIO()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("code", tail(endpoint, ["tags", "status"], 2, 10, False, out)))
    t.start()
    lat = Latency(capture_wait_ms=1, preprocess_ms=1, inference_ms=30, labelling_ms=0.1, end_to_end_ms=33.3)
    tags = TagsMessage(seq=7, frame_id=7, camera="front", captured_at="2026-01-01T00:00:00.000Z", model="m@1",
                       tags=[TagOut(group="weather", label="rain", score=0.8)], top=[], latency=lat)
    status = StatusMessage(at="2026-01-01T00:00:00.000Z", camera="front", model="m@1", trained=False, health="ok",
                           machine="aarch64", frames_processed=8, fps=30.0, tags=[])
    deadline = time.monotonic() + 10
    while t.is_alive() and time.monotonic() < deadline:  # PUB drops until the SUB has joined
        pub.send_multipart([b"tags", tags.model_dump_json().encode()])
        pub.send_multipart([b"status", status.model_dump_json().encode()])
        time.sleep(0.1)
    t.join(5)
    pub.close(0)
    ctx.term()
    lines = out.getvalue().splitlines()
    assert result["code"] == 0 and len(lines) == 2
    assert lines[0] == "tags   seq=7 frame=7 e2e=33.3ms on: weather.rain=0.80"
    assert lines[1].startswith("status ok model=m@1 trained=False machine=aarch64")
