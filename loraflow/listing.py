"""Folder listings with each file's details, as fsspec's `find(detail=True)` and `ls(detail=True)`
give them: what `digests.version` reads a file's version from (size, and an ETag or mtime).

On an object store these are fsspec's own listings (one request per 1,000 keys). On a local disk
fsspec builds each entry through several Python calls (about 0.1 ms a file); walking the folders
with `os.scandir` gives the same fields, and so the same versions, about ten times faster: at
100,000 stored latents that is the bulk of a run that finds nothing changed (`bench/scale.py`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any

from fsspec.implementations.local import LocalFileSystem


def find(fs, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file path, details) of every file under `path` (none if it does not exist), one at a time
    on a local disk: a caller that keeps a little of each never holds them all."""
    if not isinstance(fs, LocalFileSystem):
        try:
            yield from fs.find(path, detail=True).items()
        except FileNotFoundError:
            pass
        return
    folders = [fs._strip_protocol(path)]
    while folders:
        try:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    else:
                        yield entry.path, _details(entry.path, entry.stat(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while listing (or never there): as fsspec's walk does


def ls(fs, path: str) -> Iterator[dict[str, Any]]:
    """The details of every entry in the folder `path`, one at a time on a local disk (a caller that
    keeps a little of each never holds them all); FileNotFoundError if there is none."""
    local = fs._strip_protocol(path) if isinstance(fs, LocalFileSystem) else None
    if local is None or not os.path.isdir(local):
        yield from fs.ls(path, detail=True)
        return
    with os.scandir(local) as entries:
        for entry in entries:
            yield _details(entry.path, entry.stat(follow_symlinks=False))


def details_of(fs, paths: list[str]) -> dict[str, dict[str, Any]] | None:
    """{path: details} for those of `paths` that exist, one `lstat` each, on a local disk; None on
    any other filesystem, where one listing costs less than a request per path."""
    if not isinstance(fs, LocalFileSystem):
        return None
    found = {}
    for path in paths:
        local = fs._strip_protocol(path)
        try:
            found[path] = _details(local, os.lstat(local))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return found


def _details(path: str, out: os.stat_result) -> dict[str, Any]:
    """The fields of fsspec's local `info` that a version is made of, from the file's `lstat`
    (and, for a symbolic link, its target's size), as fsspec takes them."""
    link = stat.S_ISLNK(out.st_mode)
    size = out.st_size
    if link:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0
    kind = "directory" if stat.S_ISDIR(out.st_mode) else "file" if stat.S_ISREG(out.st_mode) else "other"
    return {"name": path, "size": size, "type": kind, "created": getattr(out, "st_birthtime", out.st_ctime),
            "islink": link, "mtime": out.st_mtime, "ino": out.st_ino}
