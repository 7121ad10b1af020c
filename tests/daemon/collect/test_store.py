import errno
import json
import subprocess
from pathlib import Path

import pytest

from retrofit_agent.daemon.collect.store import CaptureStore, DiskFullError


def save(store: CaptureStore, i: int, size: int = 1000, campaign: str = "rain"):
    return store.save(campaign, "2026-11-28", f"20261128T0000{i:02d}_000000Z_cam_{i:09d}", b"\xff" * size, {"i": i})


def test_pairs_are_written_with_the_sidecar_last(tmp_path: Path):
    store = CaptureStore(tmp_path, max_bytes=10**6, max_files=100)
    store.open()
    item, evicted = save(store, 1)
    assert item.image.read_bytes() == b"\xff" * 1000
    assert json.loads(item.sidecar.read_text()) == {"i": 1}
    assert item.image.stat().st_mtime_ns <= item.sidecar.stat().st_mtime_ns
    assert evicted == [] and store.files == 1 and store.bytes == item.bytes
    assert not [p for p in tmp_path.rglob(".*")]


def test_oldest_evicted_first_under_byte_and_file_caps(tmp_path: Path):
    store = CaptureStore(tmp_path, max_bytes=10**6, max_files=3)
    store.open()
    items = [save(store, i)[0] for i in range(3)]
    _, evicted = save(store, 3)
    assert evicted == [items[0]] and not items[0].image.exists() and not items[0].sidecar.exists()
    assert store.files == 3

    small = CaptureStore(tmp_path / "b", max_bytes=2500, max_files=100)
    small.open()
    first = save(small, 0)[0]
    save(small, 1)
    _, evicted = save(small, 2)
    assert evicted == [first] and small.bytes <= 2500


def test_uploader_deleting_files_is_tolerated(tmp_path: Path):
    store = CaptureStore(tmp_path, max_bytes=10**6, max_files=2)
    store.open()
    a = save(store, 0)[0]
    save(store, 1)
    a.sidecar.unlink()  # the uploader took it: sidecar first, then image
    a.image.unlink()
    _, evicted = save(store, 2)
    assert evicted == []  # already gone: not counted as an eviction
    store.rescan()
    assert store.files == 2


def test_recovery_removes_temp_files_and_orphan_images(tmp_path: Path):
    store = CaptureStore(tmp_path, max_bytes=10**6, max_files=100)
    store.open()
    good = save(store, 0)[0]
    day = good.image.parent
    (day / ".x.jpg.tmp").write_bytes(b"half")
    (day / ".x.json.tmp").write_bytes(b"{")
    (day / "orphan.jpg").write_bytes(b"no sidecar")
    removed = CaptureStore(tmp_path, 10**6, 100).open()
    assert removed == {"temp_files": 2, "orphan_images": 1}
    assert sorted(p.name for p in day.iterdir()) == sorted([good.image.name, good.sidecar.name])


def test_enospc_is_reported_and_leaves_nothing_behind(tmp_path: Path):
    calls = {"n": 0}

    def full_disk(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the sidecar write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        path.write_bytes(data)

    store = CaptureStore(tmp_path, 10**6, 100, write_file=full_disk)
    store.open()
    with pytest.raises(DiskFullError):
        save(store, 0)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert store.files == 0


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_filesystem(tiny_tmpfs: Path):
    store = CaptureStore(tiny_tmpfs / "captures", max_bytes=10**9, max_files=10**6)
    store.open()
    saved = 0
    with pytest.raises(DiskFullError):
        for i in range(100):
            save(store, i, size=8000)
            saved += 1
    assert 0 < saved < 100
    for p in (tiny_tmpfs / "captures").rglob("*"):
        if p.is_file():
            assert not p.name.startswith("."), f"temp file left behind: {p}"
            assert p.with_suffix(".jpg").exists(), f"sidecar without image: {p}"
    files = [p for p in (tiny_tmpfs / "captures").rglob("*.json")]
    assert len(files) == saved
