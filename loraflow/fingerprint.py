"""Fingerprints of model components: a hash of their config and weight content.

A component is a set of folders of a diffusers model (e.g. `text_encoder` + `tokenizer`). Its
fingerprint hashes every file's name and bytes. Files are hashed through `digests`, so an
unchanged multi-GB checkpoint is never re-read.
"""

from __future__ import annotations

from pathlib import Path

from loraflow.digests import digests
from loraflow.hashing import content_key


def fingerprint_folders(root: Path, folders: list[str]) -> str:
    """Hash of every file under `root/<folder>` for the given folders (missing folders count too)."""
    known = digests()
    entries: list[tuple[str, str]] = []
    for folder in folders:
        base = root / folder
        if not base.is_dir():
            entries.append((folder, "absent"))
            continue
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            entries.append((path.relative_to(root).as_posix(), known.local_file(path)))
    return content_key(entries)
