"""Runs and `loraflow gc` on one store never overlap: each announces itself in the store.

A run writes `live/run-<flow run id>.json` when it starts and re-writes it every
`HEARTBEAT_S` while it goes on; `gc` writes `live/gc.json` the same way. Each writes its own
marker *before* it looks for the other's, so of a run and a gc starting together at least one
sees the other: gc then deletes nothing while a run is live, and a run waits for a gc to end
before it reads the store. A marker whose heartbeat is older than `LEASE_S` (its process was
killed) no longer counts. Markers are plain JSON written whole (`Store.write_atomic`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator

from loraflow.store import Store

HEARTBEAT_S = 20.0
LEASE_S = 120.0  # a marker this stale is a killed process's (allows for clock skew between hosts)
GC_MARKER = "live/gc.json"


class StoreBusy(RuntimeError):
    pass


@contextlib.contextmanager
def announced(store: Store, marker: str, what: dict) -> Iterator[None]:
    """Keep `marker` fresh in the store while the block runs; remove it after."""
    stop = threading.Event()

    def beat() -> None:
        store.write_atomic(marker, json.dumps({**what, "heartbeat": time.time()}).encode())

    def keep_beating() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat is retried; the lease allows several
                beat()

    beat()
    thread = threading.Thread(target=keep_beating, name=f"heartbeat {marker}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            store.delete(marker)


def live(store: Store, prefix: str) -> list[dict]:
    """The fresh markers under `live/` whose name starts with `prefix`."""
    folder = store.abs("live")
    store.fs.invalidate_cache(folder)
    try:
        names = [p for p in store.fs.ls(folder, detail=False) if p.rsplit("/", 1)[-1].startswith(prefix)]
    except FileNotFoundError:
        return []
    found = []
    for path in names:
        if ".tmp-" in path:
            continue
        try:
            marker = json.loads(store.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            continue  # just removed, or not a marker
        if time.time() - float(marker.get("heartbeat", 0)) < LEASE_S:
            found.append(marker)
    return found


@contextlib.contextmanager
def live_run(store: Store, run_id: str, wait_s: float = 2 * LEASE_S) -> Iterator[None]:
    """Mark a run live for as long as the block runs; first wait for any gc of the store to end."""
    with announced(store, f"live/run-{run_id}.json", {"run": run_id, "started": time.time()}):
        deadline = time.monotonic() + wait_s
        while live(store, "gc"):
            if time.monotonic() > deadline:
                raise StoreBusy(f"store: {store.url} is being cleaned by `loraflow gc` for over {wait_s:.0f} s")
            time.sleep(0.5)
        yield


@contextlib.contextmanager
def exclusive_gc(store: Store) -> Iterator[None]:
    """Hold the store for gc, or raise StoreBusy naming the runs that are live."""
    with announced(store, GC_MARKER, {"gc": True, "started": time.time()}):
        runs = live(store, "run-")
        if runs:
            raise StoreBusy("a run is in progress on this store (flow run " + ", ".join(r["run"] for r in runs)
                            + "); nothing deleted: run gc when it has finished")
        yield
