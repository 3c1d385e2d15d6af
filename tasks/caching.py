"""The cache policy every loraflow task uses: a hash of the *content* of named inputs.

Prefect's own `INPUTS` policy hashes Python values (a tensor's memory address, a Path's string, a
pydantic model's class path), so it misses across runs or hits on stale files. `ContentKey` hashes
only the inputs a task names, through `loraflow.hashing` (fingerprints, checksums and settings,
never locations), plus the task name and `loraflow.CACHE_VERSION`.

Both are SERIALIZABLE: a run that reaches a stage another run is computing with the same key waits
for it (a leased lock, see `loraflow.locks`) and then ends `Cached` with its result.

A cache record is only as good as the artifacts it points to. Before Prefect looks a key up, the
policy reads the record (Prefect's records live in the artifact store, `records/<key>`) and, if
any object its manifest names is missing or corrupt, deletes it: the task then runs, reuses every
intact item and recomputes the rest, and its downstream keys stay the same. A record that is not a
plain JSON manifest of the task's return type (too big, not JSON, any other serializer, any shape
that fails to parse, whatever the exception) is deleted before Prefect sees it, so nothing is ever
unpickled and no garbage record can keep a stage from caching.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, get_type_hints

from prefect.cache_policies import CachePolicy
from prefect.logging import get_logger
from prefect.serializers import JSONSerializer

from loraflow import CACHE_VERSION
from loraflow.builtin import cache_root
from loraflow.hashing import content_key
from loraflow.locks import DEFAULT_LEASE_SECONDS, lock_manager
from loraflow.store import Store

logger = get_logger("loraflow.cache")

LOCKS = lock_manager(  # in Redis when LORAFLOW_LOCK_URL is set (runs on several hosts), else lock files
    cache_root() / "locks", float(os.environ.get("LORAFLOW_LOCK_LEASE_SECONDS", DEFAULT_LEASE_SECONDS)),
    os.environ.get("LORAFLOW_LOCK_URL"))


@dataclass
class ContentKey(CachePolicy):
    inputs: tuple[str, ...] = ()

    def __init__(self, *inputs: str):
        super().__init__(isolation_level="SERIALIZABLE", lock_manager=LOCKS)
        self.inputs = inputs

    def key_for(self, task_name: str, inputs: dict[str, Any]) -> str:
        return content_key(task_name, CACHE_VERSION, {name: inputs[name] for name in self.inputs})

    def input_tokens(self, inputs: dict[str, Any]) -> dict[str, str]:
        """{input name: hash of its content}: what the run report keeps, so `loraflow plan` can
        say which inputs of a stage changed since."""
        return {name: content_key(inputs[name]) for name in self.inputs}

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        key = self.key_for(task_ctx.task.name, inputs)
        drop_if_stale(task_ctx.task, key, inputs["store"])
        return key


# What `result_serializer="json"` writes. A record naming anything else (pickle, another decoder)
# is never handed to Prefect: deserializing it could run code.
RECORD_SERIALIZER = JSONSerializer().model_dump()


MAX_RECORD_BYTES = 16 * 2**20  # a manifest is a few kilobytes: anything this big is not one, and is never read


def drop_if_stale(task, key: str, store: Store) -> None:
    """Delete the record at `key` unless it is a plain JSON manifest whose objects are all intact."""
    present, _, problem = check_record(task, key, store)
    if present and problem:
        logger.warning("dropping cache record %s of %s: %s; the task runs again", key[:12], task.name, problem)
        store.delete(f"records/{key}")


def check_record(task, key: str, store: Store) -> tuple[bool, Any, str | None]:
    """(whether a record is at `key`, the manifest in it, why it cannot be trusted or None).
    Reads only: `drop_if_stale` and `loraflow plan` decide what to do about it."""
    path = f"records/{key}"
    try:
        size = store.fs.size(store.abs(path))
        raw = store.fs.cat_file(store.abs(path)) if size <= MAX_RECORD_BYTES else None
    except FileNotFoundError:
        return False, None, None
    if raw is None:
        return True, None, f"it is {size} bytes, far more than any manifest"
    try:
        manifest, problem = read_manifest(raw, get_type_hints(task.fn)["return"])
    except Exception as exc:  # any way of not being a record (deep nesting is a RecursionError): a miss
        return True, None, f"it is unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    if manifest is not None:
        broken = [ref.path for ref in store.broken(manifest.refs())]
        problem = f"{len(broken)} artifact(s) are missing or corrupt, e.g. {broken[0]}" if broken else None
    return True, manifest, problem


def read_manifest(raw: bytes, manifest_type: type) -> tuple[Any, str | None]:
    """The manifest in a record's bytes, or None and why it cannot be trusted."""
    record = json.loads(raw)
    if record["metadata"]["serializer"] != RECORD_SERIALIZER:  # before decoding the result, which could be anything
        return None, "it was not written by loraflow's JSON serializer"
    payload = json.loads(record["result"])
    if payload.get("__class__") != f"{manifest_type.__module__}.{manifest_type.__qualname__}":
        return None, f"it holds a {payload.get('__class__')}, not a {manifest_type.__name__}"
    return manifest_type.model_validate(payload["data"]), None
