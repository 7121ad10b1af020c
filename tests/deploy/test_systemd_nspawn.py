"""The daemon under a real systemd: installed by deploy/install.sh into a Debian bookworm root,
booted with systemd-nspawn (systemd 252 as PID 1), the unit's hardening on. What a vehicle's
systemd does with a bad config, a hung model, a camera missing at boot and a camera outage.

One installed root per module; every test boots its own container on an overlay of it, so its
files, journal and NRestarts start clean. tests/deploy/nspawn.py runs the container, and
tests/deploy/nspawn_root.sh builds (and caches) the root. Needs root, systemd-nspawn and
debootstrap, as CI has (scripts/test.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import nspawn
import pytest
import zmq
from nspawn import Container, JournalLine, wait_for

from deploy_helpers import DEPLOY, REPO, read_env, report
from helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UNIT = "retrofit-agent"
STATE = ("NRestarts", "ActiveState", "SubState", "Result", "ExecMainStatus", "MainPID")
ENV = read_env(DEPLOY / "arm64" / "runtime.env")
FFMPEG = shutil.which("ffmpeg")
CLIP = REPO / "models" / "sample" / "drive.mp4"  # 10 s, 640x360, 15 fps
CLIP_IN_ROOT = "/opt/retrofit-test/drive.mp4"
HOOKS_IN_ROOT = "/opt/retrofit-test-hooks"

OUTAGE_S = 120.0  # the camera outage (a tunnel, a loose connector): ridden out without a restart
CAMERA_LATE_S = 20.0  # the camera starts streaming this long after the daemon started
TEST_WATCHDOG_S = 5  # WatchdogSec for the hung-model test; the unit's 20 s would only make it slower
HANG_AFTER_RUNS = 48  # InferenceSession.run calls before the hang: 3 warm-up runs + ~3 s of frames
WAITING = "waiting_for_camera"
NEEDS_FFMPEG = pytest.mark.skipif(FFMPEG is None, reason="needs Debian's ffmpeg (scripts/test.sh installs it)")

# Written into the root as /opt/retrofit-test-hooks/sitecustomize.py; only the hung-model test's
# drop-in puts it on PYTHONPATH. No test hook in the product: the hang comes from outside. (Its
# variables must not start with RETROFIT_: the daemon reads those as settings and refuses unknown ones.)
HANG_HOOK = '''\
"""Test hook (tests/deploy/test_systemd_nspawn.py), never shipped. The drop-in appends this
directory to PYTHONPATH after the launcher's /opt/retrofit-agent/site, so Python's site module
imports it at start-up. onnxruntime's InferenceSession.run then hangs forever after
TEST_HOOK_HANG_AFTER calls, once: the marker in the StateDirectory lets the restarted daemon run."""
import os
import sys
import threading


def _chain_to_the_shadowed_sitecustomize():
    # Debian's /usr/lib/python3.11/sitecustomize.py comes later on sys.path, and this file hides it.
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        path = os.path.join(entry, "sitecustomize.py")
        if entry and os.path.abspath(entry) != here and os.path.isfile(path):
            with open(path) as f:
                exec(compile(f.read(), path, "exec"), {"__name__": "sitecustomize", "__file__": path})
            return


def _hang_inference_once():
    import onnxruntime

    after, marker = int(os.environ["TEST_HOOK_HANG_AFTER"]), os.environ["TEST_HOOK_HANG_MARKER"]
    run, calls = onnxruntime.InferenceSession.run, [0]

    def hanging_run(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > after and not os.path.exists(marker):
            open(marker, "w").close()
            print(f"retrofit-test-hook: InferenceSession.run hangs from call {calls[0]}", file=sys.stderr, flush=True)
            threading.Event().wait()
        return run(self, *args, **kwargs)

    onnxruntime.InferenceSession.run = hanging_run


_chain_to_the_shadowed_sitecustomize()
_hang_inference_once()
'''

HANG_DROPIN = f"""\
[Service]
WatchdogSec={TEST_WATCHDOG_S}
RestartSec=1
Environment=PYTHONPATH={HOOKS_IN_ROOT} TEST_HOOK_HANG_AFTER={HANG_AFTER_RUNS}
Environment=TEST_HOOK_HANG_MARKER=/var/lib/retrofit-agent/test-hang-once
"""


@dataclass(frozen=True)
class Ports:
    publish: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)
    camera: int = field(default_factory=free_port)

    @property
    def camera_url(self) -> str:
        return f"http://127.0.0.1:{self.camera}/live.ts"


def agent_toml(ports: Ports, camera: dict[str, object]) -> str:
    """The per-test /etc/retrofit-agent/agent.toml: ``camera`` keys, loopback ports the host reaches."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in camera.items()]
    return "\n".join(
        [
            "[camera]",
            *lines,
            'id = "front"',
            # The vehicle caps the reconnect back-off at 30 s; 5 s keeps reconnects within the tests' bounds.
            "backoff_max_s = 5.0",
            "[model]",
            'bundle = "/usr/share/retrofit-agent/bundles/reference"',
            "intra_op_threads = 2",
            "[publish]",
            f'endpoint = "tcp://127.0.0.1:{ports.publish}"',
            "status_interval_s = 1.0",
            "[metrics]",
            f'address = "127.0.0.1:{ports.metrics}"',
            "[log]",
            'format = "json"',
            # A campaign starts the collector, whose store lives in the unit's StateDirectory: the one
            # place ProtectSystem=strict lets the daemon write.
            "[[collect.campaigns]]",
            'name = "construction"',
            'rule = { any_of = ["scene.construction_zone"] }',
            "[collect.store]",
            'directory = "/var/lib/retrofit-agent/captures"',
            "",
        ]
    )


@dataclass
class Message:
    at: float  # time.monotonic() on arrival
    topic: str
    body: dict


class Vehicle:
    """One test's car: a container booted from a fresh overlay of the installed root, the camera
    stream the test serves, and a ZeroMQ subscriber on the daemon's ``tags`` and ``status``."""

    def __init__(self, installed: Path, tmp: Path, stack: ExitStack) -> None:
        self.installed, self.tmp, self.stack = installed, tmp, stack
        self.ports = Ports()
        self.messages: list[Message] = []
        self.container: Container | None = None
        self.camera: subprocess.Popen | None = None
        self.sub: zmq.Socket | None = None
        stack.callback(self.camera_off)

    def boot(self, config: str, dropin: str = "") -> Container:
        root = self.stack.enter_context(nspawn.overlay(self.installed, self.tmp / "overlay"))
        (root / "etc/retrofit-agent/agent.toml").write_text(config)
        if dropin:
            d = root / f"etc/systemd/system/{UNIT}.service.d"
            d.mkdir(parents=True)
            (d / "test.conf").write_text(dropin)
        machine = f"retrofit-test-{self.ports.publish}"
        self.container = self.stack.enter_context(nspawn.booted(root, machine, self.tmp / "console.log"))
        self.stack.callback(self._save_journal)  # before the poweroff: the journal lives in the container's /run
        self.subscribe()
        return self.container

    def _save_journal(self) -> None:
        try:
            (self.tmp / "journal.txt").write_text(self.container.journal_text())
        except (OSError, subprocess.SubprocessError):
            pass  # teardown of a broken container: powering it off matters more

    def subscribe(self) -> None:
        ctx = zmq.Context()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        for topic in (b"tags", b"status"):
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(f"tcp://127.0.0.1:{self.ports.publish}")  # reconnects by itself across restarts
        self.stack.callback(ctx.term)
        self.stack.callback(self.sub.close)

    def start(self) -> subprocess.CompletedProcess[str]:
        """``systemctl start``: returns once the daemon sent READY=1, or failed."""
        return self.container.run("systemctl", "start", UNIT, timeout=120)

    def state(self) -> dict[str, str]:
        return self.container.show(UNIT, *STATE)

    def journal(self) -> list[JournalLine]:
        return self.container.journal(UNIT)

    def explain(self) -> str:
        """The unit's state and journal tail, for assertion messages."""
        tail = "\n".join(f"  {l.identifier}[{l.pid}]: {l.message[:300]}" for l in self.journal()[-25:])
        return f"\nstate: {self.state()}\njournal:\n{tail}"

    def camera_on(self) -> float:
        """Debian's ffmpeg serving the clip as a live MPEG-TS stream over HTTP on loopback (as
        tests/daemon/test_faults.py does); one client, like a camera's single stream."""
        log = open(self.tmp / "ffmpeg.log", "ab")
        self.camera = subprocess.Popen(
            [
                FFMPEG,
                "-hide_banner",
                "-loglevel",
                "error",
                "-re",
                "-stream_loop",
                "-1",
                "-i",
                str(CLIP),
                "-c:v",
                "mpeg4",
                "-q:v",
                "5",
                "-g",
                "15",
                "-f",
                "mpegts",
                "-listen",
                "1",
                self.ports.camera_url,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        return time.monotonic()

    def camera_off(self) -> float:
        """The stream dies abruptly (SIGKILL: no end of stream sent)."""
        if self.camera is not None and self.camera.poll() is None:
            self.camera.send_signal(signal.SIGKILL)
            self.camera.wait(10)
        return time.monotonic()

    def listen(self, seconds: float) -> list[Message]:
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000) + 1):
                topic, body = self.sub.recv_multipart()
                out.append(Message(time.monotonic(), topic.decode(), json.loads(body)))
        self.messages += out
        return out

    def listen_until(self, what: str, done: Callable[[list[Message]], bool], timeout: float) -> list[Message]:
        """Listen until ``done(all messages so far)``; fail naming ``what`` with the unit's state."""
        deadline = time.monotonic() + timeout
        while not done(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:.0f}s{self.explain()}")
            self.listen(0.5)
        return self.messages

    def stay_up(self, seconds: float) -> list[Message]:
        """Listen for ``seconds`` while the unit must stay active and unrestarted; fail at once if not."""
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            out += self.listen(min(2.0, left))
            state = self.state()
            if state.get("NRestarts") != "0" or state.get("ActiveState") != "active":
                raise AssertionError(
                    f"the unit restarted or stopped {seconds - left:.0f}s into a "
                    f"{seconds:.0f}s window that needs no restart{self.explain()}"
                )
        return out


def tags_since(t: float) -> Callable[[list[Message]], bool]:
    return lambda msgs: any(m.topic == "tags" and m.at >= t for m in msgs)


def healths(msgs: list[Message]) -> list[str]:
    return [m.body["health"] for m in msgs if m.topic == "status"]


@pytest.fixture(scope="module")
def installed_root(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The cached Debian root, unpacked, with the daemon installed the real way (install.sh)."""
    if (reason := nspawn.missing()) is not None:
        pytest.skip(reason)
    if "{}.{}".format(*sys.version_info[:2]) != ENV["PYTHON_VERSION"]:
        pytest.skip(f"install.sh resolves wheels for the host interpreter; needs Python {ENV['PYTHON_VERSION']}")
    t0 = time.monotonic()
    tarball = nspawn.root_tarball()
    t1 = time.monotonic()
    with nspawn.tmpfs(tmp_path_factory.mktemp("nspawn")) as fs:
        root = nspawn.unpack(tarball, fs / "root")
        r = subprocess.run(
            ["bash", str(DEPLOY / "install.sh"), "--destdir", str(root), "--no-enable"],
            capture_output=True,
            text=True,
            timeout=900,
            # The venv's interpreter carries this machine's pip configuration (index, wheel cache).
            env={**os.environ, "PYTHON": sys.executable},
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        clip = root / CLIP_IN_ROOT.lstrip("/")
        clip.parent.mkdir(parents=True)
        shutil.copy(CLIP, clip)
        hooks = root / HOOKS_IN_ROOT.lstrip("/")
        hooks.mkdir(parents=True)
        (hooks / "sitecustomize.py").write_text(HANG_HOOK)
        report(request, "nspawn root tarball (cached or built), s", round(t1 - t0, 1))
        report(request, "unpack + install.sh into the root, s", round(time.monotonic() - t1, 1))
        yield root


@pytest.fixture
def vehicle(installed_root: Path, tmp_path: Path) -> Iterator[Vehicle]:
    """Torn down in reverse: subscriber closed, journal saved to tmp_path, container powered
    off, overlay unmounted, camera stream killed; also when the test failed."""
    with ExitStack() as stack:
        yield Vehicle(installed_root, tmp_path, stack)


def test_the_daemon_labels_with_the_units_hardening_in_force(vehicle: Vehicle):
    """The first real run of the unit's sandbox: it applies, and the daemon still does its job."""
    vehicle.boot(agent_toml(vehicle.ports, {"source": CLIP_IN_ROOT, "loop": True, "realtime": True}))
    assert vehicle.start().returncode == 0, vehicle.explain()
    vehicle.listen_until("tags", tags_since(0), 30)
    inside = vehicle.container.run
    pid = vehicle.state()["MainPID"]
    status = dict(l.split(":", 1) for l in inside("cat", f"/proc/{pid}/status").stdout.splitlines())
    mounts = {
        f[4]: f[5].split(",") for f in map(str.split, inside("cat", f"/proc/{pid}/mountinfo").stdout.splitlines())
    }
    user = inside("id", "-u", "retrofit-agent").stdout.strip()
    video = inside("getent", "group", "video").stdout.split(":")[2]
    assert status["Uid"].split() == [user] * 4 and user != "0"
    assert video in status["Groups"].split()  # SupplementaryGroups=video: V4L2 nodes are root:video
    assert (status["CapEff"].strip(), status["NoNewPrivs"].strip(), status["Seccomp"].strip()) == ("0" * 16, "1", "2")
    assert "ro" in mounts["/"] and "rw" in mounts["/var/lib/retrofit-agent"] and "rw" in mounts["/run/retrofit-agent"]
    assert inside("test", "-d", "/var/lib/retrofit-agent/captures").returncode == 0, "the store opens in StateDirectory"
    state = vehicle.state()
    assert (state["ActiveState"], state["NRestarts"]) == ("active", "0"), vehicle.explain()


def test_a_bad_config_exits_2_with_one_line_and_is_not_restarted(vehicle: Vehicle):
    vehicle.boot(agent_toml(vehicle.ports, {"source": CLIP_IN_ROOT, "fps": -1}))
    started = vehicle.start()
    assert started.returncode != 0, f"systemctl start must fail: no READY from a bad config{vehicle.explain()}"
    state = wait_for("the unit to fail", lambda: (s := vehicle.state())["ActiveState"] == "failed" and s, 30)
    assert (state["NRestarts"], state["Result"], state["ExecMainStatus"]) == ("0", "exit-code", "2"), vehicle.explain()
    own = wait_for(
        "the daemon's own output in the journal",
        lambda: [l.message for l in vehicle.journal() if l.identifier == UNIT],
        10,
    )
    # One line naming the field and the value, from the daemon; the rest is systemd's own.
    assert len(own) == 1 and own[0].startswith("retrofit-agent: error:"), vehicle.explain()
    assert "camera.fps" in own[0] and "-1" in own[0], own[0]


def test_b_a_hung_model_is_killed_by_the_watchdog_and_the_restarted_daemon_publishes(
    vehicle: Vehicle, request: pytest.FixtureRequest
):
    vehicle.boot(agent_toml(vehicle.ports, {"source": CLIP_IN_ROOT, "loop": True, "realtime": True}), HANG_DROPIN)
    assert vehicle.start().returncode == 0, vehicle.explain()
    first_pid = vehicle.state()["MainPID"]
    vehicle.listen_until("tags from the first daemon", tags_since(0), 30)
    hang = wait_for("the hook's hang", lambda: [l for l in vehicle.journal() if "retrofit-test-hook" in l.message], 60)
    t_hang = time.monotonic()
    wait_for(
        "'Watchdog timeout' in the journal",
        lambda: any("Watchdog timeout" in l.message for l in vehicle.journal()),
        TEST_WATCHDOG_S * 4,
    )
    t_killed = time.monotonic()
    state = wait_for(
        "the restarted unit to be active",
        lambda: (s := vehicle.state())["ActiveState"] == "active" and s["NRestarts"] != "0" and s,
        60,
    )
    vehicle.listen_until("tags from the restarted daemon (seq starting over)", seq_started_over, 60)
    manager = [l.message for l in vehicle.journal() if l.identifier == "systemd"]
    report(request, "hang → watchdog kill, s", round(t_killed - t_hang, 1))
    report(request, "systemd's lines", [m for m in manager if "retrofit-agent" in m])
    assert hang[0].pid == int(first_pid) and int(state["NRestarts"]) >= 1 and state["MainPID"] != first_pid
    assert any("Failed with result 'watchdog'" in m for m in manager), vehicle.explain()


def seq_started_over(msgs: list[Message]) -> bool:
    """A new process publishes: the ``tags`` seq went back (each daemon counts from 0)."""
    tags = [m.body["seq"] for m in msgs if m.topic == "tags"]
    return any(b < a for a, b in zip(tags, tags[1:]))


@NEEDS_FFMPEG
def test_c_a_camera_missing_at_boot_is_waited_for_without_a_restart(vehicle: Vehicle, request: pytest.FixtureRequest):
    vehicle.boot(agent_toml(vehicle.ports, {"source": vehicle.ports.camera_url, "kind": "url"}))
    t0 = time.monotonic()
    started = vehicle.start()
    report(request, "systemctl start without a camera, s", round(time.monotonic() - t0, 1))
    assert started.returncode == 0, f"the unit must become active (READY) while waiting{vehicle.explain()}"
    vehicle.listen_until(f"status health {WAITING!r}", lambda msgs: WAITING in healths(msgs), 15)
    vehicle.stay_up(max(0.0, t0 + CAMERA_LATE_S - time.monotonic()))
    t_camera = vehicle.camera_on()
    vehicle.listen_until("tags once the camera streams", tags_since(t_camera), 60)
    report(
        request,
        "camera on → first tags, s",
        round(min(m.at for m in vehicle.messages if m.topic == "tags") - t_camera, 1),
    )
    state = vehicle.state()
    assert (state["NRestarts"], state["ActiveState"]) == ("0", "active"), vehicle.explain()


@NEEDS_FFMPEG
def test_d_a_two_minute_camera_outage_passes_without_a_restart(vehicle: Vehicle, request: pytest.FixtureRequest):
    vehicle.boot(agent_toml(vehicle.ports, {"source": vehicle.ports.camera_url, "kind": "url"}))
    vehicle.camera_on()
    assert vehicle.start().returncode == 0, vehicle.explain()
    vehicle.listen_until("tags before the outage", tags_since(0), 60)
    vehicle.listen(2.0)
    t_off = vehicle.camera_off()
    during = vehicle.stay_up(OUTAGE_S)
    t_on = vehicle.camera_on()
    vehicle.listen_until("tags after the outage", tags_since(t_on), 60)
    first_after = min(m.at for m in vehicle.messages if m.topic == "tags" and m.at >= t_on)
    report(request, "camera back → first tags, s", round(first_after - t_on, 1))
    report(request, "health during the outage", sorted(set(healths(during))))
    state = vehicle.state()
    assert (state["NRestarts"], state["ActiveState"]) == ("0", "active"), vehicle.explain()
    assert {"degraded", WAITING} & set(healths(during)), healths(during)
    assert not [m for m in during if m.topic == "tags" and m.at > t_off + 5], "no tags without a camera"
