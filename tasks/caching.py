"""The cache policy every loraflow task uses: a hash of the *content* of named inputs.

Prefect's own `INPUTS` policy hashes Python values (a tensor's memory address, a Path's string, a
pydantic model's class path), so it misses across runs or hits on stale files. `ContentKey` hashes
only the inputs a task names, through `loraflow.hashing` (fingerprints, checksums and settings,
never locations), plus the task name and `loraflow.CACHE_VERSION`.

A cache record is only as good as the artifacts it points to. Before Prefect looks a key up, the
policy reads the record (Prefect's records live in the artifact store, `records/<key>`) and, if
any object its manifest names is missing or corrupt, deletes it: the task then runs, reuses every
intact item and recomputes the rest, and its downstream keys stay the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.logging import get_logger

from loraflow import CACHE_VERSION
from loraflow.hashing import content_key
from loraflow.store import Store

logger = get_logger("loraflow.cache")


@dataclass
class ContentKey(CachePolicy):
    inputs: tuple[str, ...] = ()

    def __init__(self, *inputs: str):
        super().__init__()
        self.inputs = inputs

    def key_for(self, task_name: str, inputs: dict[str, Any]) -> str:
        return content_key(task_name, CACHE_VERSION, {name: inputs[name] for name in self.inputs})

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        key = self.key_for(task_ctx.task.name, inputs)
        drop_if_stale(task_ctx.result_store, key, inputs["store"])
        return key


def drop_if_stale(result_store, key: str, store: Store) -> None:
    try:
        if not result_store.exists(key):
            return
        manifest = result_store.read(key).result
        broken = [ref.path for ref in manifest.refs() if not store.intact(ref)]
    except Exception as exc:  # unreadable record, or not a manifest: not worth keeping
        broken = [f"the record itself ({exc})"]
    if broken:
        logger.warning("cache record %s names %d missing or corrupt artifact(s), e.g. %s; recomputing",
                       key[:12], len(broken), broken[0])
        store.delete(f"records/{key}")
