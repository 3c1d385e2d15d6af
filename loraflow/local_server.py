"""The Prefect server a `loraflow run` reports to when no PREFECT_API_URL is set.

Prefect's own ephemeral mode starts a server subprocess per process, and that falls short for a CLI
in two ways:
- it shares the terminal's process group, so one Ctrl-C stops the server first; the run then
  retries reporting `Crashed` to a dead server for over a minute;
- several processes each start one on the same SQLite database, and they trip over each other's
  migrations and writes (`UNIQUE constraint failed`, "flow run not found").

So the CLI starts Prefect's server itself (the same `SubprocessASGIServer` ephemeral mode uses), in
a session of its own that dies with the CLI process, and only one CLI run at a time uses the
machine's Prefect database (`$PREFECT_HOME/prefect.db`, which `prefect server start` shows later).
A run started while another holds it gets a private database for its lifetime and says so; its
results, cache records and report are in the store either way.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import (PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED,
                              PREFECT_SERVER_DATABASE_CONNECTION_URL,
                              PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings)

from loraflow.children import die_with_parent

logger = logging.getLogger("loraflow.server")


def _own_session_dying_with_parent() -> None:  # runs in the child between fork and exec
    die_with_parent(signal.SIGTERM)


class DetachedServer(SubprocessASGIServer):
    """Prefect's ephemeral server, out of the terminal's process group (a Ctrl-C reaches only the
    run, which then reports to a server still alive) and ended by the kernel if the run dies."""

    def _run_uvicorn_command(self) -> subprocess.Popen:
        popen = subprocess.Popen
        subprocess.Popen = functools.partial(popen, start_new_session=True,
                                             preexec_fn=_own_session_dying_with_parent)
        try:
            return super()._run_uvicorn_command()
        finally:
            subprocess.Popen = popen


@contextmanager
def prefect_api() -> Iterator[None]:
    """A Prefect API for this process: the configured one, else a server of our own."""
    if PREFECT_API_URL.value():
        yield
        return
    with ExitStack() as stack:
        settings = {PREFECT_SERVER_ANALYTICS_ENABLED: False}  # offline machines: no failed-telemetry errors
        if not _database_configured() and not _lock_shared_database(stack):
            private = Path(tempfile.mkdtemp(prefix="loraflow-prefect-"))
            stack.callback(shutil.rmtree, private, ignore_errors=True)
            settings[PREFECT_SERVER_DATABASE_CONNECTION_URL] = f"sqlite+aiosqlite:///{private}/prefect.db"
            logger.warning("another loraflow run is using the Prefect database in %s; this run uses a private one "
                           "(its report and results are in the store)", PREFECT_HOME.value())
        with temporary_settings(updates=settings):
            server = DetachedServer()
            server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        stack.callback(server.stop)
        stack.callback(APILogWorker.drain_all, timeout=5)  # before the server stops: the run's last logs reach it
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield


def _database_configured() -> bool:
    """True when the user chose a database (e.g. Postgres): sharing it is then theirs to arrange."""
    from prefect.settings import get_current_settings

    return "PREFECT_SERVER_DATABASE_CONNECTION_URL" in get_current_settings().to_environment_variables(exclude_unset=True)


def _lock_shared_database(stack: ExitStack) -> bool:
    """Take the machine's Prefect database for this run, if no other loraflow run has it."""
    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    lock = stack.enter_context(open(home / "loraflow-cli.lock", "a"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the process ends, however it ends
    except BlockingIOError:
        return False
    return True
