"""Remembered digests: the sha256 of bytes loraflow has already read, keyed by a *stamp*.

A stamp names one version of one file without reading it: its URL plus what the filesystem says
about it (size, and an ETag, mtime, ctime or inode). A file whose stamp was seen before is not
read again: an unchanged multi-GB checkpoint, dataset image or stored latent costs one listing,
not a download. Any rewrite changes the stamp (S3 gives a new ETag; a local rewrite a new ctime),
so a changed file is always re-read. Caption files' text is kept the same way.

The table lives in `LORAFLOW_HOME/digests.sqlite`, shared by concurrent runs on one machine. A
fresh machine simply has no entries and reads everything once. The store enters every object it
writes (`Store.put`), so what this machine wrote is known-good without being read back.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from loraflow.builtin import cache_root

# Fields that change whenever a file is rewritten, by filesystem (S3/GCS/Azure/local/memory).
VERSION_FIELDS = ("ETag", "etag", "md5Hash", "content_settings", "mtime", "LastModified", "last_modified",
                  "updated", "created", "ino")


def local_stamp(path: Path) -> str:
    st = path.stat()
    # ctime and inode too: `cp -p`, `rsync -t` or `tar` can restore an old mtime, never an old ctime.
    return f"file://{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def remote_stamp(url: str, info: dict[str, Any]) -> str | None:
    """Stamp of an fsspec listing entry, or None when the filesystem reports no version field."""
    return stamp_of(url, version(info))


def stamp_of(url: str, listed: str | None) -> str | None:
    """Stamp of the file at `url` in the version `listed` (`version`'s string; None: no stamp)."""
    return f"{url}|{listed}" if listed else None


def version(info: dict[str, Any]) -> str | None:
    """What an fsspec listing entry says about its file's version (size and version fields), or
    None when the filesystem reports no version field."""
    versions = [f"{name}={info[name]}" for name in VERSION_FIELDS if info.get(name) not in (None, "")]
    return "|".join([str(info.get("size")), *versions]) if versions else None


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Digests:
    """The table: one connection per process (shared by its threads), lookups and inserts in
    batches of any size, and rows not re-verified for `KEEP_DAYS` pruned when a process opens it."""

    KEEP_DAYS = 30  # a row unused this long costs one re-read of its file, at most once a month

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str, float]] = []  # rows `put` has not written yet
        self._pid = os.getpid()  # a forked child has its own table (`digests`), never this connection
        atexit.register(self.flush)
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            # A power cut may lose the last entries (files are then read once more), never corrupt
            # the table; syncing every commit would cost more than hashing a small object.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS digests_v2 "
                             "(stamp TEXT PRIMARY KEY, sha256 TEXT NOT NULL, verified REAL NOT NULL)")
            # Upright image sizes by image sha256 (aspect-ratio buckets), so an unchanged image is not read.
            self._db.execute("CREATE TABLE IF NOT EXISTS image_sizes "
                             "(sha256 TEXT PRIMARY KEY, height INTEGER NOT NULL, width INTEGER NOT NULL)")
            # Caption files' text by stamp, so an unchanged caption file is not read again.
            self._db.execute("CREATE TABLE IF NOT EXISTS texts "
                             "(stamp TEXT PRIMARY KEY, text TEXT NOT NULL, verified REAL NOT NULL)")
            self._db.execute("DROP TABLE IF EXISTS digests")  # v1: no verification time, cannot be pruned
            for table in ("digests_v2", "texts"):  # pruned through an index: reads only what it deletes
                self._db.execute(f"CREATE INDEX IF NOT EXISTS {table}_verified ON {table} (verified)")
                self._db.execute(f"DELETE FROM {table} WHERE verified < ?", (time.time() - self.KEEP_DAYS * 86400,))

    def get(self, stamp: str | None) -> str | None:
        return self.get_many([stamp]).get(stamp) if stamp else None

    def get_many(self, stamps: list[str | None]) -> dict[str, str]:
        """{stamp: sha256} for the stamps seen before (None stamps never are)."""
        wanted = [s for s in dict.fromkeys(stamps) if s]
        return dict(self._select("SELECT stamp, sha256 FROM digests_v2 WHERE stamp", wanted))

    def put(self, stamp: str | None, sha256: str) -> None:
        """Remember one (stamp, sha256), with the next ones: rows are written PENDING_MAX at a time,
        before any lookup, and when the process exits (an object stored just before a crash is read
        back once, later). A transaction per object cost more than storing a small latent."""
        if not stamp:
            return
        with self._lock:
            self._pending.append((stamp, sha256, time.time()))
            if len(self._pending) < PENDING_MAX:
                return
        self.flush()

    def flush(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        rows, self._pending = self._pending, []
        self._write_locked("INSERT OR REPLACE INTO digests_v2 VALUES (?, ?, ?)", rows)

    def put_many(self, pairs: list[tuple[str | None, str]]) -> None:
        """Remember many (stamp, sha256) pairs in one transaction."""
        now = time.time()
        self._write("INSERT OR REPLACE INTO digests_v2 VALUES (?, ?, ?)",
                    [(stamp, sha256, now) for stamp, sha256 in pairs if stamp])

    def forget(self, urls: list[str]) -> None:
        """Drop the rows of every version of the files at `urls` (deleted by `loraflow gc`)."""
        self.flush()
        self._write("DELETE FROM digests_v2 WHERE stamp > ? AND stamp < ?", [(f"{u}|", f"{u}}}") for u in urls])

    def image_sizes(self, shas: list[str]) -> dict[str, tuple[int, int]]:
        """{image sha256: (height, width)} for the images whose size was recorded."""
        return {sha: (h, w) for sha, h, w in self._select("SELECT sha256, height, width FROM image_sizes WHERE sha256", shas)}

    def put_image_sizes(self, sizes: dict[str, tuple[int, int]]) -> None:
        self._write("INSERT OR REPLACE INTO image_sizes VALUES (?, ?, ?)", [(sha, h, w) for sha, (h, w) in sizes.items()])

    def texts(self, stamps: list[str | None]) -> dict[str, str]:
        """{stamp: text} for the text files (captions) read before in these versions."""
        return dict(self._select("SELECT stamp, text FROM texts WHERE stamp", [s for s in dict.fromkeys(stamps) if s]))

    def put_texts(self, pairs: list[tuple[str | None, str]]) -> None:
        now = time.time()
        self._write("INSERT OR REPLACE INTO texts VALUES (?, ?, ?)", [(stamp, text, now) for stamp, text in pairs if stamp])

    def _select(self, query: str, keys: list[str]) -> list[tuple]:
        """The rows of `query IN (keys)`, in batches of at most BATCH keys."""
        rows: list[tuple] = []
        with self._lock:
            if os.getpid() == self._pid:
                self._flush_locked()  # what `put` kept is found too
            for start in range(0, len(keys), BATCH):
                chunk = keys[start:start + BATCH]
                rows += self._db.execute(f"{query} IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        return rows

    def _write(self, statement: str, rows: list[tuple]) -> None:
        """`statement` for every row, in one transaction."""
        with self._lock:
            self._write_locked(statement, rows)

    def _write_locked(self, statement: str, rows: list[tuple]) -> None:
        if not rows:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(statement, rows)
            self._db.execute("COMMIT")
        except BaseException:  # a signal may land anywhere, even after COMMIT
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def local_file(self, path: Path) -> str:
        """sha256 of a local file, read only if this version of it was never hashed."""
        stamp = local_stamp(path)
        digest = self.get(stamp)
        if digest is None:
            digest = hash_file(path)
            self.put(stamp, digest)
        return digest


BATCH = 500  # stamps per query: under SQLite's limit on bound parameters
PENDING_MAX = 256  # rows `put` keeps before writing them in one transaction
_open: dict[tuple[str | None, int], Digests] = {}
_open_lock = threading.Lock()


def digests() -> Digests:
    """The table for the current LORAFLOW_HOME, opened once per process (a forked child opens its own)."""
    key = (os.environ.get("LORAFLOW_HOME"), os.getpid())  # looked up per object written: no Path work here
    with _open_lock:
        if key not in _open:
            _open[key] = Digests(cache_root() / "digests.sqlite")
        return _open[key]
