"""The dataset sensor: emit `loraflow.dataset.changed` when a dataset folder's listing changed.

The `finetune/on-demand` deployment has a trigger on that event (deployments/prefect.yaml), so
`loraflow watch` (or the `dataset-watch` deployment, on an interval) is all it takes to retrain
when images are added, removed or edited. A run that follows re-encodes only what is new.

What counts as the dataset: the folder's own listing, one level deep, as `load_dataset` reads it:
each file's name, size and version fields (ETag or mtime); captions and metadata.jsonl included.
Listing is cheap on any fsspec filesystem; no image is read.

The last fingerprint is recorded in the store, at `watch/<key of the source>.json` (a folder
`loraflow gc` leaves alone). A dataset seen for the first time counts as changed: a run then
trains it, or finds everything Cached if it was trained before, so starting a watch never misses
a change made before it. The fingerprint is recorded only once the event was delivered, so a
failed delivery is retried by the next watch (at least once, never silently dropped).

The event carries the watch config's own fields (`cfg`, as given: a file's fields and `--set`
overrides), which the deployment's trigger passes on as the run's `cfg`; the run keeps the
deployment's values for every other field. `storage_options` never travel in the event (they may
hold credentials): the triggered run uses the deployment's and the worker's environment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from loraflow.builtin import BUILTIN_PREFIX
from loraflow.config import RunConfig
from loraflow.dataset import DatasetError, builtin_dataset
from loraflow.digests import version
from loraflow.hashing import content_key
from loraflow.remote import storage_options
from loraflow.store import Store

EVENT = "loraflow.dataset.changed"
RESOURCE_PREFIX = "loraflow.dataset."


class WatchError(Exception):
    """The event cannot be sent."""


@dataclass
class Watched:
    """What one watch found: the dataset's fingerprint now, the one recorded before (None: never
    watched), and whether the event was emitted."""

    source: str
    fingerprint: str
    previous: str | None
    files: int
    emitted: bool


def dataset_id(source: str) -> str:
    """The dataset's identity in event resource ids and record names: its source (a local path
    made absolute), hashed."""
    return content_key(_normal(source))[:16]


def fingerprint(cfg: RunConfig, options: dict[str, Any] | None = None) -> tuple[str, int]:
    """A hash of the dataset folder's listing (name, size, version of each file) and the file count."""
    source = cfg.dataset.source
    if source.startswith(BUILTIN_PREFIX):
        source = builtin_dataset(source[len(BUILTIN_PREFIX):])
    try:
        fs, root = url_to_fs(source, **(options or {}))
        root = root.rstrip("/")
        fs.invalidate_cache(root)  # a long-lived process (a worker) must see today's listing
        listing = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise DatasetError(f"dataset.source: {source!r} does not exist") from None
    entries = sorted((info["name"].rstrip("/").rsplit("/", 1)[-1], version(info) or str(info.get("size")))
                     for info in listing if info.get("type") != "directory")
    return content_key(entries), len(entries)


def watch(cfg: RunConfig) -> Watched:
    """Fingerprint the dataset, compare with the store's record, emit the event if it changed."""
    options = storage_options(cfg.storage_options, cfg.storage_secret)
    store = Store(cfg.store, options)
    record = f"watch/{dataset_id(cfg.dataset.source)}.json"
    previous = _recorded(store, record)
    now, files = fingerprint(cfg, options)
    found = Watched(source=_normal(cfg.dataset.source), fingerprint=now, previous=previous, files=files, emitted=False)
    if now == previous:
        return found
    emit(found, cfg)
    found.emitted = True
    store.write_atomic(record, json.dumps({"source": found.source, "fingerprint": now, "files": files,
                                           "seen": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode())
    return found


def emit(found: Watched, cfg: RunConfig) -> None:
    """Send the event and wait until the server has it (raises if it cannot be delivered).

    `prefect.events.emit_event` only queues an event for a background worker that logs, not
    raises, a failed delivery; the events client used here sends it and closes the websocket
    cleanly (the server reads every message before the close), or raises.
    """
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.asyncutils import run_coro_as_sync

    if not PREFECT_API_URL.value():  # a temporary server of this process's own would drop it
        raise WatchError("no Prefect server to tell: set PREFECT_API_URL to the server whose deployment retrains")
    event = Event(
        event=EVENT,
        resource={"prefect.resource.id": RESOURCE_PREFIX + dataset_id(cfg.dataset.source),
                  "prefect.resource.name": found.source, "loraflow.dataset.source": found.source},
        payload={"cfg": event_cfg(cfg), "fingerprint": found.fingerprint, "previous": found.previous,
                 "files": found.files})

    async def send() -> None:
        async with get_events_client(reconnection_attempts=3) as client:
            await client.emit(event)

    run_coro_as_sync(send())


def event_cfg(cfg: RunConfig) -> dict[str, Any]:
    """The fields the watch config sets, as JSON, without `storage_options` (see the module doc);
    local paths made absolute, since the worker runs elsewhere than the watch."""
    data = cfg.model_dump(mode="json", exclude_unset=True, exclude={"storage_options"})
    if "source" in data.get("dataset", {}):
        data["dataset"]["source"] = _normal(data["dataset"]["source"])
    if "store" in data and "://" not in data["store"]:
        data["store"] = _normal(data["store"])
    return data


def _recorded(store: Store, record: str) -> str | None:
    try:
        return json.loads(store.fs.cat_file(store.abs(record)))["fingerprint"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None  # never watched, or a record this version cannot read: counts as changed


def _normal(source: str) -> str:
    if "://" in source or source.startswith(BUILTIN_PREFIX):
        return source.rstrip("/")
    return str(Path(source).expanduser().resolve())
