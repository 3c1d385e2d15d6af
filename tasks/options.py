"""What every loraflow task has besides its cache key: retries with backoff when the store fails in a
way that passes (a dropped connection, a timeout, a throttled request). Any other error, a bad input
or a full disk, fails the task at once with its message."""

from __future__ import annotations

import errno

from prefect.tasks import exponential_backoff

RETRIES = 3  # after 2, 4 and 8 s (jittered): about 15 s for a store to come back
TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EAGAIN,
                    errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH}
# Exception names of the object-store clients (botocore, aiohttp, gcsfs, adlfs) that mean "try again".
TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                   "ClientConnectionError", "ClientOSError", "ServerDisconnectedError", "ServerTimeoutError",
                   "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}


def is_transient(exc: BaseException | None) -> bool:
    """True if `exc`, or an error it was raised from, is one that passes with time."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in TRANSIENT_NAMES:
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry only a transient store error."""
    return is_transient(state.result(raise_on_failure=False, fetch=True) if state.data is None else state.data)


def stage(name: str) -> dict:
    """The `@task` options of stage `name`: `@task(**stage("train"), cache_policy=..., ...)`."""
    # cache_result_in_memory=False: Prefect's in-memory cache of results (up to 1,000 records, shared by
    # every task run of a flow run) would keep every shard's manifest alive until the flow ends; the
    # task run's state still holds its own result, for as long as the flow holds that state.
    return dict(name=name, retries=RETRIES, cache_result_in_memory=False,
                retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
                retry_condition_fn=retry_if_transient)

