"""Captured images off the car: the uplink against moto's standalone S3 server (PyPI
``moto[server]``; no S3 server is packaged in Debian bookworm, and s3rver from npm does not
check SigV4 signatures). moto keeps its buckets in memory, so an object-store outage is a
loopback TCP proxy in front of it that is shut (connections reset, new ones refused) and
reopened on the same port: to the uplink, the store is gone and comes back.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplink_helpers import S3Server, Uplink, wait_until, write_pair

from helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BUCKET = "fleet-captures"
VEHICLE = "car-s3"


class Proxy:
    """A TCP forwarder on a fixed loopback port that can be shut and reopened."""

    def __init__(self, target: int) -> None:
        self.port, self.target = free_port(), target  # below the ephemeral range: see free_port
        self.socks: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def open(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 15
        while True:
            try:
                ls.bind(("127.0.0.1", self.port))
                break
            except OSError:
                # Something else may hold the port for a moment; reopening on this very port
                # is the point of the test, so wait for it rather than pick another.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        ls.listen(16)
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                a, _ = ls.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the store is gone (the module is ending): drop this client
                a.close()
                continue
            self.socks += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(x: socket.socket, y: socket.socket) -> None:
        try:
            while data := x.recv(65536):
                y.sendall(data)
        except OSError:
            pass
        finally:
            for s in (x, y):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def shut(self) -> None:
        if self.listener is not None:
            # close() alone leaves a listener that another thread is blocked in accept() on
            # listening (Linux): the port stays taken and the next connection is still let
            # through. shutdown() wakes the accept with EINVAL and frees the port at once.
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        for s in self.socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass
        self.socks = []


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    tmp = tmp_path_factory.mktemp("s3")
    server = S3Server().start(tmp / "moto.log")
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def uplink_for(tmp: Path, store: Path, endpoint: str, name: str, rate: int = 0, **env: str) -> Uplink:
    return Uplink(
        tmp,
        [
            "--endpoint",
            f"ipc://{tmp}/no-daemon.sock",
            "--mqtt",
            f"mqtt://127.0.0.1:{free_port()}",
            "--journal",
            str(tmp / "journal"),
            "--vehicle",
            VEHICLE,
            "--captures",
            str(store),
        ],
        env={
            "RETROFIT_UPLINK_S3": json.dumps(
                {
                    "endpoint": endpoint,
                    "bucket": BUCKET,
                    "access_key_id": "AKIDTEST",
                    "secret_access_key": "secret-test",
                    "part_size": 5 * 1024**2,
                    "multipart_threshold": 5 * 1024**2,
                }
            ),
            "RETROFIT_UPLINK_CAPTURES__MAX_BYTES_PER_S": str(rate),
            "RETROFIT_UPLINK_CAPTURES__RETRY_S": "0.5",
            "RETROFIT_UPLINK_CAPTURES__RESCAN_INTERVAL_S": "0.5",
            **env,
        },
        name=name,
    ).start()


def bucket_objects(s3: S3Server, prefix: str) -> dict[str, bytes]:
    c = s3.client()
    keys = [
        o["Key"]
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return {k: c.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def check_bucket(s3: S3Server, prefix: str, pairs: dict[str, bytes]) -> None:
    objects = bucket_objects(s3, prefix)
    images = {k: v for k, v in objects.items() if k.endswith(".jpg")}
    assert len(images) == len(pairs), (len(images), len(pairs))
    for key, body in images.items():
        name = key.rsplit("/", 1)[1][:-4]
        sidecar = json.loads(objects[key[:-4] + ".json"])
        assert hashlib.sha256(body).hexdigest() == sidecar["image_sha256"] == hashlib.sha256(pairs[name]).hexdigest()


def test_store_outage_mid_burst_every_pair_lands_once_with_its_checksum_and_leaves_the_car(
    s3: S3Server, tmp_path: Path
):
    store = tmp_path / "captures"
    pairs = {}
    for i in range(24):
        name = f"20261129T1200{i:02d}_000000Z_front_{i:09d}"
        pairs[name] = os.urandom(150_000)
        write_pair(store, "night_rain", name, pairs[name])
    proxy = Proxy(s3.port)
    proxy.open()
    uplink = uplink_for(tmp_path, store, f"http://127.0.0.1:{proxy.port}", "uplink-s3", rate=1_000_000)
    uplink.wait_ready()
    wait_until(lambda: uplink.metric("retrofit_uplink_captures_uploaded_total") >= 5, 30, "first uploads")
    proxy.shut()
    before = uplink.metric("retrofit_uplink_captures_uploaded_total")
    time.sleep(3)
    assert uplink.metric("retrofit_uplink_captures_uploaded_total") == before
    proxy.open()
    t = time.monotonic()
    wait_until(lambda: not list(store.rglob("*.json")), 60, "store emptied")
    print(
        f"\n[uplink figure] captures left after the store came back: {len(pairs) - before:.0f}, uploaded in "
        f"{time.monotonic() - t:.1f}s at 1 MB/s"
    )
    failures = uplink.metric("retrofit_uplink_capture_failures_total")
    uplink.stop()
    proxy.shut()
    assert failures >= 1
    assert not list(store.rglob("*.jpg")), "every pair deleted locally once confirmed"
    check_bucket(s3, f"captures/{VEHICLE}/night_rain/2026-11-29/", pairs)
    names = [
        json.loads(l)["capture"] for l in uplink.logs().splitlines() if l.startswith("{") and '"capture_uploaded"' in l
    ]
    assert names == sorted(names) and len(set(names)) == len(pairs), "capture order, once each"


def test_sigkill_during_a_multipart_upload_resumes_without_loss_or_duplicate(s3: S3Server, tmp_path: Path):
    store = tmp_path / "captures"
    name = "20261129T130000_000000Z_front_000000001"
    image = os.urandom(12 * 1024**2)
    write_pair(store, "big", name, image)
    uplink = uplink_for(tmp_path, store, s3.endpoint, "uplink-mp", rate=4 * 1024**2)
    uplink.wait_ready()
    time.sleep(2.0)  # part 1 (5 MiB at 4 MiB/s) is confirmed, part 2 is on the wire
    uplink.kill()
    assert (store / "big/2026-11-29" / f"{name}.json").exists()
    uplink.start()
    wait_until(lambda: not list(store.rglob("*.json")), 60, "pair uploaded after the restart")
    uplink.stop()
    events = [e for e in uplink.events() if e.get("event") == "capture_upload_resumed"]
    assert events and events[0]["parts_done"] >= 1, "resumed from the next part, not from scratch"
    check_bucket(s3, f"captures/{VEHICLE}/big/", {name: image})
    assert not s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads"), "no unfinished upload left behind"


def test_eviction_by_the_daemon_never_takes_a_pair_being_uploaded(s3: S3Server, tmp_path: Path):
    from retrofit_agent.daemon.collect.store import CaptureStore

    store_dir = tmp_path / "captures"
    name = "20261129T140000_000000Z_front_000000002"
    image = os.urandom(1_500_000)
    write_pair(store_dir, "evict", name, image)
    uplink = uplink_for(tmp_path, store_dir, s3.endpoint, "uplink-evict", rate=500_000)
    uplink.wait_ready()
    time.sleep(1.0)  # the upload (3 s at 0.5 MB/s) is under way
    store = CaptureStore(store_dir, max_bytes=1_600_000, max_files=10)
    store.open()
    _, evicted = store.save(
        "evict", "2026-11-29", "20261129T140500_000000Z_front_000000003", os.urandom(400_000), {"image_sha256": "x"}
    )
    assert [e.image.name for e in evicted] == [f"{name}.jpg"], "the daemon evicted the pair mid-upload"
    wait_until(lambda: uplink.metric("retrofit_uplink_captures_uploaded_total") >= 1, 30, "upload finished")
    uplink.stop()
    objects = bucket_objects(s3, f"captures/{VEHICLE}/evict/")
    assert (
        hashlib.sha256(objects[f"captures/{VEHICLE}/evict/2026-11-29/{name}.jpg"]).hexdigest()
        == hashlib.sha256(image).hexdigest()
    ), "the upload completed with the complete bytes"
