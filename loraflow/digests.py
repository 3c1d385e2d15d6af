"""Remembered digests: the sha256 of bytes loraflow has already read, keyed by a *stamp*.

A stamp names one version of one file without reading it: its URL plus what the filesystem says
about it (size, and an ETag, mtime, ctime or inode). A file whose stamp was seen before is not
read again: an unchanged multi-GB checkpoint, dataset image or stored latent costs one listing,
not a download. Any rewrite changes the stamp (S3 gives a new ETag; a local rewrite a new ctime),
so a changed file is always re-read.

The table lives in `LORAFLOW_HOME/digests.sqlite`, shared by concurrent runs on one machine. A
fresh machine simply has no entries and reads everything once.
"""

from __future__ import annotations

import hashlib
import sqlite3
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
    versions = [f"{name}={info[name]}" for name in VERSION_FIELDS if info.get(name) not in (None, "")]
    if not versions:
        return None
    return "|".join([url, str(info.get("size")), *versions])


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Digests:
    def __init__(self, path: Path | None = None):
        self.path = path or cache_root() / "digests.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS digests (stamp TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get(self, stamp: str | None) -> str | None:
        if stamp is None:
            return None
        with self._connect() as db:
            row = db.execute("SELECT sha256 FROM digests WHERE stamp = ?", (stamp,)).fetchone()
        return row[0] if row else None

    def put(self, stamp: str | None, sha256: str) -> None:
        if stamp is None:
            return
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?)", (stamp, sha256))

    def local_file(self, path: Path) -> str:
        """sha256 of a local file, read only if this version of it was never hashed."""
        stamp = local_stamp(path)
        digest = self.get(stamp)
        if digest is None:
            digest = hash_file(path)
            self.put(stamp, digest)
        return digest


def digests() -> Digests:
    """The table for the current LORAFLOW_HOME."""
    return Digests()
