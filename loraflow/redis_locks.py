"""Leased cache locks in Redis, for runs on several hosts that share a store (`LORAFLOW_LOCK_URL`).

prefect-redis's `RedisLockManager` takes each lock as a Redis key (`lock:<cache key>`, its value
the holder) with no expiry, so a holder killed while it held one would block every later run
forever. Here, as with the file locks (`loraflow.locks`), every lock is a lease: the key expires
`lease_seconds` after it was last renewed, and the holding process renews it every third of that
while it lives. A renewal is redis-py's `Lock.reacquire`, a Lua script that resets the expiry only
if the key still holds this holder's token, so a lock that lapsed and was taken by another run is
never extended. Needs the `redis` extra (`pip install -e '.[redis]'`).
"""

from __future__ import annotations

import asyncio
import time

from prefect_redis.locking import RedisLockManager
from redis.exceptions import LockError, RedisError

from loraflow.locks import DEFAULT_LEASE_SECONDS, LeaseRenewal, logger

POLL_SECONDS = 0.1  # how often a waiter looks again (redis-py's Lock polls as often)


def connect(url: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> LeasedRedisLockManager:
    """The lock manager for `url` (LORAFLOW_LOCK_URL), once its server answers a PING. Errors name
    the variable, never the URL (it may hold a password)."""
    try:
        manager = LeasedRedisLockManager(url, lease_seconds)
    except ValueError as exc:  # redis-py's URL parsing
        raise ValueError(f"LORAFLOW_LOCK_URL is not a Redis URL (redis://host:port/db): {exc}") from None
    try:
        manager.client.ping()
    except RedisError as exc:
        raise ConnectionError(f"LORAFLOW_LOCK_URL: no Redis server answers there: {exc}") from None
    return manager


class LeasedRedisLockManager(LeaseRenewal, RedisLockManager):
    def __init__(self, url: str, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        super().__init__(connection_url=url)
        self._init_leases(lease_seconds)

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        """Take the lock as a lease, waiting for another holder to release it or for its lease to end."""
        if not super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.lease_seconds):
            return False
        self._hold(key, holder)
        return True

    async def aacquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        # The renewer thread extends locks with the synchronous client: take them with it too.
        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key, holder) -> None:
        self._forget(key)
        super().release_lock(key, holder)

    def wait_for_lock(self, key, timeout=None) -> bool:
        """Wait until the lock is free (released, or its lease lapsed) without taking it: prefect-redis
        takes and drops a lock with no expiry, which a waiter killed in between would leave forever."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.client.exists(self._lock_name_for_key(key)):
            if deadline is not None and time.monotonic() + POLL_SECONDS > deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def await_for_lock(self, key, timeout=None) -> bool:
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)

    def _renew(self, key: str, holder: str) -> None:
        """Reset the key's expiry to one lease, if it still holds this holder's token."""
        with self._mutex:
            lock = self._locks.get(self._lock_name_for_key(key))
            if self._held.get(key) != holder or lock is None:
                return  # released meanwhile
            try:
                lock.reacquire()  # atomic: compares the token, then PEXPIREs
            except LockError:  # lapsed (and maybe taken by another run): not ours to extend
                self._held.pop(key, None)
                logger.warning("the lock on %s lapsed before it was renewed: another run may compute it too", key[:12])
