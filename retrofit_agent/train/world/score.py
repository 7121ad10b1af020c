"""Scoring what the daemon published against a world clip's ground truth (torch-free).

The daemon's ``tags`` messages carry ``top``: the best label of every group for that frame,
after the camera's own softmax within the group. Each is compared with the clip sidecar's
label for that frame (``frame_id`` is the frame's index in a file played without
``--realtime``). Groups whose truth is ``null`` (not observable: weather inside a tunnel, an
illegible sign) are skipped, and so is the first ``settle_s`` after each segment change,
where the picture itself is changing over.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrofit_agent.train.world.records import FrameRecord


@dataclass
class GroupScore:
    correct: int = 0
    total: int = 0
    confusions: dict[tuple[str, str], int] = field(default_factory=dict)  # (truth, said) -> frames

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def read_truth(sidecar: Path) -> dict[int, FrameRecord]:
    lines = Path(sidecar).read_text(encoding="utf-8").splitlines()
    return {r.frame: r for r in (FrameRecord.model_validate_json(line) for line in lines if line.strip())}


def settled(truth: dict[int, FrameRecord], settle_s: float) -> set[int]:
    """Frames at least ``settle_s`` after the start of their segment."""
    start: dict[int, float] = {}
    for r in sorted(truth.values(), key=lambda r: r.frame):
        start.setdefault(r.segment_index, r.time_s)
    return {f for f, r in truth.items() if r.time_s - start[r.segment_index] >= settle_s}


def score_tags(
    messages: Iterable[dict[str, Any]], truth: dict[int, FrameRecord], settle_s: float = 1.0
) -> dict[str, GroupScore]:
    """Per-group accuracy of the published top labels on the settled frames."""
    keep = settled(truth, settle_s)
    scores: dict[str, GroupScore] = defaultdict(GroupScore)
    for msg in messages:
        frame = msg.get("frame_id")
        if frame not in keep:
            continue
        said = {t["group"]: t["label"] for t in msg.get("top", [])}
        for group, label in truth[frame].labels.items():
            if label is None or group not in said:
                continue
            s = scores[group]
            s.total += 1
            if said[group] == label:
                s.correct += 1
            else:
                key = (label, said[group])
                s.confusions[key] = s.confusions.get(key, 0) + 1
    return dict(scores)


def format_scores(scores: dict[str, GroupScore], goal: float | None = None) -> str:
    rows = [f"{'group':16}{'frames':>8}{'top-1':>8}  most frequent error"]
    for group, s in scores.items():
        worst = max(s.confusions.items(), key=lambda kv: kv[1], default=None)
        err = f"{worst[0][0]} -> {worst[0][1]} ({worst[1]})" if worst else ""
        mark = "" if goal is None else ("  " if s.accuracy >= goal else " <")
        rows.append(f"{group:16}{s.total:>8}{s.accuracy:>8.1%}{mark} {err}")
    return "\n".join(rows)


def tags_from_jsonl(path: Path) -> list[dict[str, Any]]:
    """``retrofit-agent tail --json`` style lines (one message per line) → tags messages."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            msg = json.loads(line)
            if msg.get("topic") == "tags":
                out.append(msg)
    return out
