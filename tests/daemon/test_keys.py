"""`retrofit-agent keys`: never overwrites a key, secrets 0600 from the first byte, fingerprints."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
import zmq.auth
from zmq.utils import z85

from helpers import REPO, agent_command, run_cli
from retrofit_agent.contract import keyfiles
from retrofit_agent.contract.errors import ConfigError

pytestmark = pytest.mark.integration


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _printed(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.strip().splitlines())


def _raw_ed25519_public(path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(path.read_bytes())
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.mark.parametrize("kind", ["curve", "signing"])
def test_existing_keys_are_refused_without_force_and_left_untouched(tmp_path, kind):
    first = run_cli("keys", kind, str(tmp_path), "--name", "cam")
    assert first.returncode == 0, first.stderr
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    again = run_cli("keys", kind, str(tmp_path), "--name", "cam")
    assert again.returncode == 2
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith("retrofit-agent keys: error: ") and "already exists" in line and "--force" in line
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files  # nothing replaced, no temp file left


@pytest.mark.parametrize("kind", ["curve", "signing"])
def test_force_replaces_the_pair(tmp_path, kind):
    a = _printed(run_cli("keys", kind, str(tmp_path), "--name", "cam").stdout)
    b = _printed(run_cli("keys", kind, str(tmp_path), "--name", "cam", "--force").stdout)
    assert a["fingerprint"] != b["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(a["public"]).name, Path(a["secret"]).name])


@pytest.mark.parametrize("kind", ["curve", "signing"])
def test_secret_is_0600_public_is_0644_even_under_umask_0(tmp_path, kind):
    # umask is inherited: run the CLI in a child whose umask lets everything through.
    cmd = agent_command("keys", kind, str(tmp_path), "--name", "cam")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, preexec_fn=lambda: os.umask(0), timeout=60)
    assert out.returncode == 0, out.stderr
    printed = _printed(out.stdout)
    assert _mode(Path(printed["secret"])) == 0o600
    assert _mode(Path(printed["public"])) == 0o644


def test_curve_fingerprint_is_sha256_of_the_raw_public_key(tmp_path):
    printed = _printed(run_cli("keys", "curve", str(tmp_path), "--name", "cam").stdout)
    public, secret = zmq.auth.load_certificate(printed["secret"])  # the certificate zmq.auth reads
    assert secret and zmq.auth.load_certificate(printed["public"]) == (public, None)
    assert printed["fingerprint"] == "sha256:" + hashlib.sha256(z85.decode(public)).hexdigest()[:16]


def test_signing_fingerprint_is_sha256_of_the_raw_public_key(tmp_path):
    printed = _printed(run_cli("keys", "signing", str(tmp_path), "--name", "owner").stdout)
    raw = _raw_ed25519_public(Path(printed["public"]))
    assert len(raw) == 32
    assert printed["fingerprint"] == "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def test_secret_is_complete_and_0600_before_it_gets_its_name(tmp_path, monkeypatch):
    """Atomic: the bytes are written and fsynced to a 0600 temp file in the same directory,
    which is then linked to its name; nobody ever sees a partial or readable secret."""
    seen = []
    real_link = os.link

    def spy(src, dst, *a, **kw):
        seen.append((Path(src).parent, _mode(Path(src)), Path(src).read_bytes(), Path(dst).exists()))
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(os, "link", spy)
    old = os.umask(0)
    try:
        keyfiles.write_key_file(tmp_path / "s.key_secret", b"secret bytes", keyfiles.SECRET_MODE)
    finally:
        os.umask(old)
    assert seen == [(tmp_path, 0o600, b"secret bytes", False)]
    assert [p.name for p in tmp_path.iterdir()] == ["s.key_secret"]


def test_write_key_file_never_replaces_without_force(tmp_path):
    target = tmp_path / "k"
    target.write_bytes(b"old")
    with pytest.raises(ConfigError, match="already exists"):
        keyfiles.write_key_file(target, b"new", keyfiles.SECRET_MODE)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["k"]
    keyfiles.write_key_file(target, b"new", keyfiles.SECRET_MODE, force=True)
    assert target.read_bytes() == b"new" and _mode(target) == 0o600
