"""Remote inputs through fsspec: credentials, and a local mirror of a remote model folder.

Credentials are resolved here, at run time, inside the run's process, and go nowhere else: not
into flow parameters, cache keys, logs, reports or blocks saved on the Prefect server. Three
sources, merged in this order:
1. the environment, read by the filesystem itself (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
   AWS_ENDPOINT_URL for s3fs, GOOGLE_APPLICATION_CREDENTIALS for gcsfs, or fsspec's own
   FSSPEC_<PROTOCOL>_<OPTION> variables);
2. `storage_options` in the config;
3. the Prefect Secret block named by `storage_secret` (a JSON object of fsspec options).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from loraflow.builtin import cache_root
from loraflow.digests import remote_stamp
from loraflow.hashing import content_key


def storage_options(options: dict[str, Any], secret_block: str | None) -> dict[str, Any]:
    """The fsspec options for this run's remote URLs."""
    if not secret_block:
        return dict(options)
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(secret_block).get()
    except Exception as exc:
        raise ValueError(f"storage_secret: cannot load the Prefect Secret block {secret_block!r}: "
                         f"{type(exc).__name__}") from None
    if not isinstance(secret, dict):
        raise ValueError(f"storage_secret: the Secret block {secret_block!r} must hold a JSON object of fsspec options")
    return {**options, **secret}


def is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def mirror_folder(url: str, options: dict[str, Any]) -> Path:
    """A local copy of a remote folder (a diffusers model), kept in sync by listing stamps.

    Only files whose stamp (size + ETag or mtime) changed since the last mirror are downloaded,
    so an unchanged multi-GB model costs one listing. Files are moved into place whole.
    """
    fs, root = url_to_fs(url, **options)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    listing = {path: info for path, info in fs.find(root, detail=True).items() if info.get("type") != "directory"}
    if not listing:
        raise FileNotFoundError(f"{url} is empty or does not exist")
    local = cache_root() / "mirrors" / content_key(url)[:24]
    stamps_file = local / ".loraflow-stamps"
    known = dict(line.split("\t", 1) for line in stamps_file.read_text().splitlines()) if stamps_file.exists() else {}
    stamps = {}
    for path, info in sorted(listing.items()):
        rel = path[len(root) + 1:]
        stamp = remote_stamp(f"{url.rstrip('/')}/{rel}", info) or uuid.uuid4().hex  # no version field: re-fetch
        target = local / rel
        if known.get(rel) != stamp or not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            fs.get_file(path, str(tmp))
            os.replace(tmp, target)
        stamps[rel] = stamp
    for stale in set(known) - set(stamps):
        (local / stale).unlink(missing_ok=True)
    tmp = stamps_file.with_name(f".stamps-{uuid.uuid4().hex[:8]}")
    tmp.write_text("".join(f"{rel}\t{stamp}\n" for rel, stamp in sorted(stamps.items())))
    os.replace(tmp, stamps_file)
    return local
