"""The durable on-vehicle journal: every message the uplink takes is appended here before
anything else happens to it, and deleted only once the broker acknowledged it (PUBACK).

SQLite (stdlib) in WAL mode. ``synchronous = FULL`` by default: a car loses power without
warning (ignition off, a flat battery), and its flash has a write cache, so a commit is
only a promise once it has been fsynced. Appends are batched (one transaction per receive
burst, at most every few tens of milliseconds), so the cost is a handful of fsyncs a second.
``NORMAL`` (config) still survives a crash of the uplink itself, as WAL commits reach the OS
before the call returns, but the last commits may vanish on power loss.

Bounded by bytes (payload bytes plus a per-row overhead) and by age; when a bound bites the
oldest rows go first, and the caller counts and logs them. Row ids come from AUTOINCREMENT,
so they are never reused and order every message across restarts.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from retrofit_agent.contract.errors import ConfigError

ROW_OVERHEAD = 64  # bytes counted per row beyond its payload: id, stream, time, b-tree cells
FILE_NAME = "journal.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,        -- the MQTT topic it goes to
    received REAL NOT NULL,      -- unix time it was journaled (the age bound)
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_stream ON messages (stream, id);
CREATE TABLE IF NOT EXISTS input_streams (
    key TEXT PRIMARY KEY,        -- camera/topic as the daemon publishes it
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (
    sidecar TEXT PRIMARY KEY,    -- the pair being uploaded in parts
    key TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    parts TEXT NOT NULL          -- JSON [[part number, etag], ...] of parts the store confirmed
);
"""


@dataclass(frozen=True)
class Row:
    id: int
    stream: str
    payload: bytes


@dataclass(frozen=True)
class Dropped:
    count: int
    bytes: int
    first_id: int
    last_id: int


def connect(directory: Path, synchronous: str = "full") -> sqlite3.Connection:
    """Open (creating) the journal database; ConfigError (one line) if the directory is unusable."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(directory / FILE_NAME, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL back to 64 MB after checkpoints
        conn.executescript(_SCHEMA)
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"journal.directory: cannot use {directory}: {getattr(e, 'strerror', None) or e}") from None
    return conn


class Journal:
    """Owned by one thread (the uplink's main loop); the uploader opens its own connection."""

    def __init__(self, directory: Path, max_bytes: int, max_age_s: float, synchronous: str = "full") -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.db = connect(directory, synchronous)
        count, payload = self.db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages").fetchone()
        self.count = int(count)
        self.bytes = int(payload) + ROW_OVERHEAD * self.count

    # ------------------------------------------------------------------ writing

    def append(
        self, rows: Iterable[tuple[str, bytes]], streams: dict[str, tuple[str, int]], now: float | None = None
    ) -> list[int]:
        """Append ``(stream, payload)`` rows and the input streams' last (run_id, seq), in one
        transaction; returns the new ids. Nothing is forwarded before this returns."""
        now = time.time() if now is None else now
        ids = []
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for stream, payload in rows:
                cur.execute("INSERT INTO messages (stream, received, payload) VALUES (?, ?, ?)", (stream, now, payload))
                ids.append(int(cur.lastrowid or 0))
                self.count += 1
                self.bytes += len(payload) + ROW_OVERHEAD
            cur.executemany(
                "INSERT INTO input_streams (key, run_id, seq) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id, seq = excluded.seq",
                [(k, run, seq) for k, (run, seq) in streams.items()],
            )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            self._recount()
            raise
        return ids

    def delete(self, ids: Iterable[int], sent_high: int | None = None) -> int:
        """Remove acknowledged rows (ids already gone are fine) and record the highest id ever
        published, in one transaction; returns how many rows went."""
        ids = list(ids)
        if not ids:
            return 0
        gone = 0
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        if sent_high is not None:
            cur.execute(
                "INSERT INTO meta (key, value) VALUES ('sent_high', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(sent_high),),
            )
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            size = cur.execute(
                f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages WHERE id IN ({marks})", chunk
            ).fetchone()
            cur.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
            gone += int(size[0])
            self.count -= int(size[0])
            self.bytes -= int(size[1]) + ROW_OVERHEAD * int(size[0])
        cur.execute("COMMIT")
        return gone

    def trim(self, now: float | None = None) -> dict[str, Dropped]:
        """Enforce the age and byte bounds, oldest first; returns what went, by reason."""
        now = time.time() if now is None else now
        out = {}
        old = self._drop_where("received < ?", (now - self.max_age_s,))
        if old.count:
            out["journal_age"] = old
        if self.bytes > self.max_bytes:
            excess = self.bytes - self.max_bytes
            last = self._oldest_covering(excess)
            if last is not None:
                full = self._drop_where("id <= ?", (last,))
                if full.count:
                    out["journal_bytes"] = full
        return out

    def _oldest_covering(self, excess: int) -> int | None:
        """The id up to which the oldest rows add up to ``excess`` bytes: one range delete, not one per row."""
        total, after = 0, 0
        while True:
            chunk = self.db.execute(
                "SELECT id, length(payload) FROM messages WHERE id > ? ORDER BY id LIMIT 1000", (after,)
            ).fetchall()
            if not chunk:
                return after or None
            for row_id, size in chunk:
                total += int(size) + ROW_OVERHEAD
                if total >= excess:
                    return int(row_id)
            after = int(chunk[-1][0])

    def _drop_where(self, where: str, args: tuple[object, ...]) -> Dropped:
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        n, size, first, last = cur.execute(
            f"SELECT count(*), coalesce(sum(length(payload)), 0), min(id), max(id) FROM messages WHERE {where}", args
        ).fetchone()
        if n:
            cur.execute(f"DELETE FROM messages WHERE {where}", args)
        cur.execute("COMMIT")
        self.count -= int(n)
        self.bytes -= int(size) + ROW_OVERHEAD * int(n)
        return Dropped(int(n), int(size), int(first or 0), int(last or 0))

    def _recount(self) -> None:
        count, payload = self.db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages").fetchone()
        self.count = int(count)
        self.bytes = int(payload) + ROW_OVERHEAD * self.count

    # ------------------------------------------------------------------ reading

    def streams(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT stream FROM messages")]

    def next_rows(self, stream: str, after_id: int, limit: int = 256) -> list[Row]:
        return [
            Row(int(i), stream, bytes(p))
            for i, p in self.db.execute(
                "SELECT id, payload FROM messages WHERE stream = ? AND id > ? ORDER BY id LIMIT ?",
                (stream, after_id, limit),
            )
        ]

    def max_id(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        return int(row[0]) if row else 0

    def oldest_received(self) -> float | None:
        row = self.db.execute("SELECT received FROM messages ORDER BY id LIMIT 1").fetchone()
        return float(row[0]) if row else None

    def input_streams(self) -> dict[str, tuple[str, int]]:
        return {k: (run, int(seq)) for k, run, seq in self.db.execute("SELECT key, run_id, seq FROM input_streams")}

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def close(self) -> None:
        self.db.close()
