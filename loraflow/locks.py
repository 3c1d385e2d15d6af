"""Leased locks for Prefect's SERIALIZABLE cache transactions.

Two runs that reach the same stage with the same cache key must compute it once: the second waits
for the first's lock, then finds its cache record and ends `Cached`. Prefect's
`FileSystemLockManager` takes locks with no expiry, so a run killed while holding one (OOM,
preemption, SIGKILL) would make every later run wait forever.

Here every lock is a lease: it expires `lease_seconds` after it was last renewed, and a thread in
the holding process renews it every third of that while the process lives. A killed holder stops
renewing, and its lock is free at most one lease later. Lock files live on the local disk, so this
serialises runs on one machine (or on a shared filesystem); runs on different hosts that share an
object-store cache keep their locks in Redis instead (`LORAFLOW_LOCK_URL`, `loraflow.redis_locks`),
leased and renewed the same way.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pydantic_core
from prefect.locking.filesystem import FileSystemLockManager
from prefect.locking.protocol import LockManager
from prefect.logging import get_logger
from prefect.types._datetime import now

DEFAULT_LEASE_SECONDS = 60.0

logger = get_logger("loraflow.locks")


def lock_manager(lock_files_directory: Path, lease_seconds: float, url: str | None = None) -> LockManager:
    """File locks in `lock_files_directory`, or Redis locks when `url` (LORAFLOW_LOCK_URL) is set.
    A bad URL, a missing `redis` extra or a server that does not answer is one error naming
    LORAFLOW_LOCK_URL, raised here, when a run starts (never the URL itself: it may hold a password)."""
    if not url:
        return LeasedFileSystemLockManager(lock_files_directory, lease_seconds)
    try:
        from loraflow.redis_locks import connect
    except ImportError as exc:
        raise RuntimeError(f"LORAFLOW_LOCK_URL is set, but prefect-redis is not installed "
                           f"(pip install -e '.[redis]'): {exc}") from None
    return connect(url, lease_seconds)


class LeaseRenewal:
    """A daemon thread that renews every lock this process holds, every third of a lease.

    A manager calls `_init_leases` when it is made, `_hold` once it has a lock and `_forget` before
    it releases one, and implements `_renew(key, holder)`: extend the lock by one lease if (and only
    if) it is still this holder's, taking `_mutex` so that a release never interleaves."""

    def _init_leases(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._held: dict[str, str] = {}  # key -> holder, for locks this process holds
        self._mutex = threading.Lock()
        self._renewer: threading.Thread | None = None

    def _hold(self, key: str, holder: str) -> None:
        with self._mutex:
            self._held[key] = holder
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_forever, name="loraflow-lock-lease", daemon=True)
                self._renewer.start()

    def _forget(self, key: str) -> None:
        with self._mutex:
            self._held.pop(key, None)

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.lease_seconds / 3)
            with self._mutex:
                held = dict(self._held)
                if not held:  # nothing left to renew: the next `_hold` starts another thread
                    self._renewer = None
                    return
            for key, holder in held.items():
                try:
                    self._renew(key, holder)
                except Exception as exc:  # a failed renewal (e.g. the server briefly away) is retried next time
                    logger.warning("could not renew the lock on %s: %s", key[:12], exc)

    def _renew(self, key: str, holder: str) -> None:
        raise NotImplementedError

    # A manager travels with the cache policy to wherever a task runs (a Dask worker process). The
    # copy holds none of this process's locks and renews its own.
    def __getstate__(self) -> dict:
        state = {**super().__getstate__(), "lease_seconds": self.lease_seconds}
        for name in ("_held", "_mutex", "_renewer"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        parent = getattr(super(), "__setstate__", None)
        parent(state) if parent else self.__dict__.update(state)
        self._init_leases(state["lease_seconds"])


class LeasedFileSystemLockManager(LeaseRenewal, FileSystemLockManager):
    def __init__(self, lock_files_directory: Path, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        super().__init__(lock_files_directory)
        self._init_leases(lease_seconds)

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        """Take the lock, waiting for another holder's lease to end. The lock file appears with its
        content in one step (hard link of a complete file), so a waiter never reads half of it."""
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        while True:
            if self.is_locked(key) and not self.is_lock_holder(key, holder):
                if not self.wait_for_lock(key, acquire_timeout):
                    return False
            expiration = now("UTC") + timedelta(seconds=hold_timeout or self.lease_seconds)
            tmp = self._write_temporary(path, holder, expiration)
            try:
                os.link(tmp, path)
            except FileExistsError:
                if not self.is_lock_holder(key, holder):
                    continue  # another run took it first: wait for it
                os.replace(tmp, path)  # ours already: extend it
            finally:
                tmp.unlink(missing_ok=True)
            self._locks[key] = {"holder": holder, "expiration": expiration, "path": path}
            self._hold(key, holder)
            return True

    def is_locked(self, key, use_cache=False) -> bool:
        try:
            return super().is_locked(key, use_cache)
        except FileNotFoundError:  # an expired lock another waiter removed first
            self._locks.pop(key, None)
            return False

    async def aacquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    @staticmethod
    def _write_temporary(path: Path, holder: str, expiration) -> Path:
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(pydantic_core.to_json({"holder": holder, "expiration": str(expiration)}))
        return tmp

    def release_lock(self, key, holder) -> None:
        self._forget(key)
        super().release_lock(key, holder)

    def _renew(self, key: str, holder: str) -> None:
        """Push the lock's expiry one lease ahead, if it is still this holder's."""
        path = self._lock_path_for_key(key)
        with self._mutex:
            try:
                current = pydantic_core.from_json(path.read_bytes())
            except (OSError, ValueError):
                return
            if self._held.get(key) != holder or current.get("holder") != holder:
                return  # released, or lapsed and taken by another run: not ours to extend
            expiration = now("UTC") + timedelta(seconds=self.lease_seconds)
            os.replace(self._write_temporary(path, holder, expiration), path)
            if key in self._locks:
                self._locks[key]["expiration"] = expiration
