"""``retrofit-agent tail``: subscribe to a running daemon and print what it publishes.

Messages go to stdout; what tail itself has to say goes to stderr, one line each: what it
is waiting for, once that nothing has arrived after a few seconds, and why it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import zmq

from retrofit_agent.contract.bundle import Manifest
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.messages import TOPICS
from retrofit_agent.daemon.curve import make_curve_client

PROG = "retrofit-agent tail"


@dataclass(frozen=True)
class TailOptions:
    endpoint: str
    topics: tuple[str, ...] = TOPICS
    count: int | None = None  # exit 0 after this many messages
    timeout_s: float | None = None  # exit 1 after this long
    raw: bool = False  # print the JSON payloads as they are
    curve: tuple[Path, Path] | None = None  # (this client's secret certificate, the daemon's public one)
    quiet_notice_s: float = 5.0  # say once that nothing arrived after this long
    summary: bool = False  # per-group counts of the tags messages at exit


def format_message(topic: str, msg: dict[str, Any]) -> str:
    if topic == "tags":
        tags = " ".join(f"{t['group']}.{t['label']}={t['score']:.2f}" for t in msg["tags"]) or "-"
        return f"tags   seq={msg['seq']} frame={msg['frame_id']} e2e={msg['latency']['end_to_end_ms']:.1f}ms on: {tags}"
    if topic == "events":
        t = msg["tag"]
        return f"event  seq={msg['seq']} frame={msg['frame_id']} {msg['event']} {t['group']}.{t['label']} ({t['score']:.2f})"
    if topic == "status":
        return (
            f"status {msg['health']} model={msg['model']} trained={msg['trained']} machine={msg['machine']} "
            f"frames={msg['frames_processed']} fps={msg['fps']}"
        )
    if topic == "captures":
        return f"saved  seq={msg['seq']} {msg['campaign']} {msg['role']}{msg['offset']:+d} frame={msg['frame_id']} {msg['path']}"
    return f"{topic} {json.dumps(msg)}"


class Summary:
    """How many frames each label was its group's top label, and how many it was on (a tag)."""

    def __init__(self) -> None:
        self.frames = 0
        self.models: list[str] = []
        self.top: dict[str, Counter[str]] = defaultdict(Counter)
        self.on: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, topic: str, msg: dict[str, Any]) -> None:
        if topic != "tags":
            return
        self.frames += 1
        if msg.get("model") and msg["model"] not in self.models:
            self.models.append(msg["model"])
        for t in msg.get("top", []):
            self.top[t["group"]][t["label"]] += 1
        for t in msg.get("tags", []):
            self.on[t["group"]][t["label"]] += 1

    def lines(self) -> list[str]:
        models = ", ".join(self.models) or "no model"
        out = [f"summary: {self.frames} frames from {models}"]
        if not self.frames:
            return out
        out.append(f"  {'group':14}{'label':24}{'top':>6}{'on':>6}   (frames the label was its group's best / a tag)")
        for group in sorted(set(self.top) | set(self.on)):
            labels = sorted(
                set(self.top[group]) | set(self.on[group]), key=lambda l: (-self.top[group][l], -self.on[group][l], l)
            )
            for i, label in enumerate(labels):
                name = group if i == 0 else ""
                out.append(f"  {name:14}{label:24}{self.top[group][label]:>6}{self.on[group][label]:>6}")
        return out


def legend(manifest: Manifest, bundle: Path) -> list[str]:
    """What the bundle is (trained or not, its notice), its labels, and how to read tail's lines."""
    state = "trained" if manifest.trained else "UNTRAINED: its labels are not meaningful"
    out = [f"bundle {bundle}: {manifest.model_id}, {state}"]
    if manifest.notice:
        out.append(f"  notice: {manifest.notice}")
    groups = manifest.bank.groups
    out.append(
        f"labels ({sum(len(g.labels) for g in groups)} in {len(groups)} groups; a softmax within each group; "
        "(bg) = background, never a tag):"
    )
    for g in groups:
        names = ", ".join(f"{lab.name}{' (bg)' if lab.negative else ''}" for lab in g.labels)
        thresholds = sorted({lab.threshold for lab in g.labels})
        out.append(f"  {g.name:14}{names}   [tag at p >= {'/'.join(f'{t:g}' for t in thresholds)}]")
    out += [
        "lines:",
        "  tags   seq=… frame=… e2e=…ms on: GROUP.LABEL=P …   every frame: the labels that are on (p at or above "
        "the threshold), '-' if none",
        "  event  … tag_on|tag_off GROUP.LABEL (P)              a tag turned on or off",
        "  status HEALTH model=… trained=… frames=… fps=…       every few seconds: the daemon's state",
    ]
    return out


def _connect(opts: TailOptions) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if opts.curve is not None:
            make_curve_client(sock, *opts.curve)
        for t in opts.topics:
            sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        sock.connect(opts.endpoint)
    except zmq.ZMQError as e:
        sock.close()
        raise ConfigError(
            f"--endpoint: cannot connect to {opts.endpoint!r}: {zmq.strerror(e.errno or 0)}; use tcp://HOST:PORT or ipc://PATH"
        ) from None
    except ConfigError:
        sock.close()
        raise
    return sock


def tail(opts: TailOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print messages until ``count`` were shown (0), ``timeout_s`` passed (1) or interrupted (0).

    Raises ConfigError for an endpoint or certificate that cannot be used.
    """
    sock = _connect(opts)
    via = " with CURVE" if opts.curve else ""
    _say(err, f"waiting for messages from {opts.endpoint}{via} (topics: {', '.join(opts.topics)})")
    start = time.monotonic()
    deadline = None if opts.timeout_s is None else start + opts.timeout_s
    summary = Summary()
    shown = 0
    code = 0
    noticed = False
    try:
        while opts.count is None or shown < opts.count:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                _say(err, _timeout_reason(opts, shown))
                code = 1
                break
            if not shown and not noticed and now - start >= opts.quiet_notice_s:
                _say(
                    err,
                    f"no messages from {opts.endpoint} in {opts.quiet_notice_s:g} s; is retrofit-agent running "
                    "and publishing there? (still waiting)",
                )
                noticed = True
            wait_s = 0.25 if deadline is None else min(0.25, deadline - now)
            if not sock.poll(max(1, int(wait_s * 1000))):
                continue
            topic_b, payload = sock.recv_multipart()
            topic, text = topic_b.decode(errors="replace"), payload.decode(errors="replace")
            try:
                msg = json.loads(text)
                summary.add(topic, msg)
                line = text if opts.raw else format_message(topic, msg)
            except (ValueError, KeyError, TypeError):  # not a retrofit-agent message: show it as it came
                line = f"{topic} {text}"
            out.write(line + "\n")
            out.flush()
            shown += 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM turned into one by the CLI
        code = 0
    finally:
        sock.close()
    if opts.summary:
        out.write("\n".join(summary.lines()) + "\n")
        out.flush()
    return code


def _timeout_reason(opts: TailOptions, shown: int) -> str:
    if not shown:
        return (
            f"error: no messages from {opts.endpoint} in {opts.timeout_s:g} s (--timeout); "
            "is retrofit-agent running and publishing there?"
        )
    wanted = f" of --count {opts.count}" if opts.count is not None else ""
    return f"error: --timeout {opts.timeout_s:g} s reached after {shown}{wanted} messages"


def _say(err: TextIO, line: str) -> None:
    err.write(f"{PROG}: {line}\n")
    err.flush()


__all__ = ["tail", "TailOptions", "Summary", "format_message", "legend", "TOPICS"]
