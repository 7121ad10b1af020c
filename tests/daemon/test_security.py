"""CURVE-protected publishing, signed bundles, loopback-only defaults."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from helpers import REPO, receive, run_cli
from retrofit_agent.contract.bundle import load_bundle, read_manifest, write_manifest
from retrofit_agent.contract.errors import BundleError
from retrofit_agent.contract.signing import sign_bundle
from retrofit_agent.daemon.curve import make_curve_client
from retrofit_agent.daemon.replay import ReplayClient, replay_endpoint_for

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retrofit_agent", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture
def curve_keys(tmp_path: Path) -> dict[str, Path]:
    auth = tmp_path / "authorized"
    for kind, d, name in (
        ("curve", tmp_path / "server", "server"),
        ("curve", auth, "ground-station"),
        ("curve", tmp_path / "stranger", "stranger"),
    ):
        r = cli("keys", kind, str(d), "--name", name)
        assert r.returncode == 0, r.stderr
    return {
        "server_secret": tmp_path / "server" / "server.key_secret",
        "server_public": tmp_path / "server" / "server.key",
        "authorized": auth,
        "client_secret": auth / "ground-station.key_secret",
        "stranger_secret": tmp_path / "stranger" / "stranger.key_secret",
    }


def test_curve_admits_only_authorised_subscribers(start_agent, clip, seeded_bundle, tmp_path, curve_keys):
    (curve_keys["authorized"] / "ground-station.key_secret").rename(tmp_path / "client.key_secret")
    client_secret = tmp_path / "client.key_secret"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[publish.curve]\nserver_secret_key = "{curve_keys["server_secret"]}"\n'
        f'authorized_keys_dir = "{curve_keys["authorized"]}"\n'
    )
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--loop", "--bundle", str(seeded_bundle))
    ctx = zmq.Context()
    socks = {}
    for name, secret in (("authorised", client_secret), ("stranger", curve_keys["stranger_secret"]), ("plain", None)):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        if secret is not None:
            make_curve_client(s, secret, curve_keys["server_public"])
        s.connect(agent.endpoint)
        socks[name] = s
    agent.wait_ready()
    got = {name: receive(s, 3.0) for name, s in socks.items()}
    for s in socks.values():
        s.close()
    # The replay socket takes the same keys: a stranger gets no old messages either.
    run_id = next(m["run_id"] for t, m in got["authorised"] if t == "tags")
    replay_at = replay_endpoint_for(agent.endpoint)
    replayed = {
        name: ReplayClient(replay_at, timeout_ms=1500, curve=keys, context=ctx).fetch(run_id, "tags", 0, 3)
        for name, keys in (
            ("authorised", (client_secret, curve_keys["server_public"])),
            ("stranger", (curve_keys["stranger_secret"], curve_keys["server_public"])),
            ("plain", None),
        )
    }
    ctx.term()
    assert agent.stop() == 0
    assert len([m for t, m in got["authorised"] if t == "tags"]) >= 5
    assert got["stranger"] == [] and got["plain"] == []
    authorised = replayed["authorised"]
    assert authorised is not None and [json.loads(p)["seq"] for p in authorised.payloads] == [0, 1, 2]
    assert replayed["stranger"] is None and replayed["plain"] is None
    assert '"curve": true' in agent.logs()


def test_tail_with_curve(start_agent, clip, seeded_bundle, tmp_path, curve_keys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[publish.curve]\nserver_secret_key = "{curve_keys["server_secret"]}"\n'
        f'authorized_keys_dir = "{curve_keys["authorized"]}"\n'
    )
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--loop", "--bundle", str(seeded_bundle))
    agent.wait_ready()
    r = cli(
        "tail",
        "--endpoint",
        agent.endpoint,
        "--count",
        "3",
        "--timeout",
        "10",
        "--topic",
        "tags",
        "--curve-client-cert",
        str(curve_keys["client_secret"]),
        "--curve-server-key",
        str(curve_keys["server_public"]),
    )
    agent.stop()
    assert r.returncode == 0 and r.stdout.count("tags   seq=") == 3, r.stderr


@pytest.fixture
def signing(tmp_path: Path) -> dict[str, Path]:
    for name in ("owner", "other"):
        assert cli("keys", "signing", str(tmp_path / "keys"), "--name", name).returncode == 0
    keys = tmp_path / "keys"
    return {
        "owner": keys / "owner.ed25519.pem",
        "owner_pub": keys / "owner.ed25519.pub.pem",
        "other": keys / "other.ed25519.pem",
        "other_pub": keys / "other.ed25519.pub.pem",
    }


def test_signed_bundle_loads_and_tampering_is_refused(bundle_copy, signing):
    r = cli("sign-bundle", str(bundle_copy), "--key", str(signing["owner"]))
    assert r.returncode == 0, r.stderr
    load_bundle(bundle_copy, signing["owner_pub"])
    with pytest.raises(BundleError, match="signed by another key"):
        load_bundle(bundle_copy, signing["other_pub"])

    # Tampered manifest (even one re-hashed consistently): the signature no longer matches.
    m = read_manifest(bundle_copy)
    write_manifest(bundle_copy, m.model_copy(update={"trained": True}))
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(bundle_copy, signing["owner_pub"])


@pytest.mark.parametrize("victim", ["student.int8.onnx", "bank.npz"])
def test_tampered_files_of_a_signed_bundle_are_refused(bundle_copy, signing, victim):
    sign_bundle(bundle_copy, signing["owner"])
    with open(bundle_copy / victim, "r+b") as f:
        f.seek(200)
        f.write(b"\x13\x37")
    with pytest.raises(BundleError, match=f"sha256 mismatch for '{victim}'"):
        load_bundle(bundle_copy, signing["owner_pub"])


def test_unsigned_bundle_is_refused_when_a_key_is_configured(clip, bundle_copy, signing, tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[model]\nbundle = "{bundle_copy}"\nsigning_public_key = "{signing["owner_pub"]}"\n')
    r = run_cli("--config", str(cfg), "--camera", str(clip), "--no-metrics", "--publish", f"ipc://{tmp_path}/x.sock")
    assert r.returncode == 2 and "unsigned (manifest.json.sig missing)" in r.stderr and "Traceback" not in r.stderr
    sign_bundle(bundle_copy, signing["owner"])
    r = run_cli(
        "--config",
        str(cfg),
        "--camera",
        str(clip),
        "--no-metrics",
        "--publish",
        f"ipc://{tmp_path}/x.sock",
        "--max-frames",
        "2",
    )
    assert r.returncode == 0, r.stderr[-1000:]


def test_exposed_binds_are_explicit_and_logged(start_agent, clip, seeded_bundle, tmp_path):
    from helpers import free_port

    port = free_port()
    agent = start_agent(
        "--camera",
        str(clip),
        "--bundle",
        str(seeded_bundle),
        "--max-frames",
        "2",
        "--publish",
        f"tcp://0.0.0.0:{port}",
    )
    assert agent.proc.wait(60) == 0
    events = {e["event"]: e for e in agent.events()}
    assert events["publishing_beyond_loopback"]["endpoint"] == f"tcp://0.0.0.0:{port}"
    assert "metrics_beyond_loopback" not in events


def test_no_pickle_eval_or_shell_in_the_runtime():
    import ast

    problems = []
    for path in (REPO / "retrofit_agent").rglob("*.py"):
        if "train" in path.relative_to(REPO / "retrofit_agent").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "subprocess", "shelve") for n in names):
                    problems.append(f"{where} imports {names}")
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                if name in ("eval", "exec", "system", "popen"):
                    problems.append(f"{where} calls {name}")
                if name == "load" and isinstance(fn, ast.Attribute) and getattr(fn.value, "id", "") == "np":
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                        problems.append(f"{where} np.load without allow_pickle=False")
    assert not problems, problems
