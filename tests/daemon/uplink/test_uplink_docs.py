"""The README documents every uplink setting and metric, and its consumer example de-duplicates."""

from __future__ import annotations

import json
import re
import sqlite3
from types import SimpleNamespace

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from helpers import REPO
from retrofit_agent.daemon.uplink.config import UplinkConfig
from retrofit_agent.daemon.uplink.metrics import UplinkMetrics

README = (REPO / "README.md").read_text()
SECTION = README.split("## Uplink", 1)[1].split("\n## ", 1)[0]


def _keys(model: type[BaseModel], prefix: str = ""):  # type: ignore[no-untyped-def]
    for name, field in model.model_fields.items():
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (inner[0] if inner else None)
        if sub is not None:
            yield from _keys(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_readme_documents_every_uplink_setting_and_metric():
    missing = [k for k in _keys(UplinkConfig) if f"`{k}`" not in SECTION]
    assert not missing, missing
    reg = CollectorRegistry()
    UplinkMetrics.create(reg)
    for family in reg.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}" in SECTION, name


def test_the_readme_consumer_example_keeps_each_message_once(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", SECTION, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(code, ns)  # noqa: S102 - the README's own example
    body = {"vehicle": "car", "camera": "front", "run_id": "r", "topic": "events", "seq": 3}
    for _ in range(3):
        ns["on_message"](
            None, None, SimpleNamespace(topic="retrofit/car/front/events", payload=json.dumps(body).encode())
        )
    assert sqlite3.connect(tmp_path / "backend.db").execute("SELECT count(*) FROM seen").fetchone() == (1,)
