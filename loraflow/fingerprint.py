"""Fingerprints of model components: a hash of their config and weight content.

A component is a set of folders of a diffusers model (e.g. `text_encoder` + `tokenizer`). Its
fingerprint hashes every file's name and bytes. Hashing a multi-GB checkpoint on every run would
be slow, so per-file digests are remembered in a small JSON cache keyed by (path, size, mtime,
ctime, inode): an unchanged file is never re-read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from loraflow.builtin import cache_root
from loraflow.hashing import content_key


def _digest_cache_path() -> Path:
    return cache_root() / "file-digests.json"


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(_digest_cache_path().read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _save_cache(cache: dict[str, str]) -> None:
    path = _digest_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache))
    tmp.replace(path)


def file_digest(path: Path, cache: dict[str, str]) -> str:
    st = path.stat()
    # ctime and inode too: `cp -p`, `rsync -t` or `tar` can restore an old mtime, never an old ctime.
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    if stamp not in cache:
        cache[stamp] = hash_file(path)
    return cache[stamp]


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_folders(root: Path, folders: list[str]) -> str:
    """Hash of every file under `root/<folder>` for the given folders (missing folders count too)."""
    cache = _load_cache()
    before = len(cache)
    entries: list[tuple[str, str]] = []
    for folder in folders:
        base = root / folder
        if not base.is_dir():
            entries.append((folder, "absent"))
            continue
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            entries.append((path.relative_to(root).as_posix(), file_digest(path, cache)))
    if len(cache) != before:
        _save_cache(cache)
    return content_key(entries)
