"""loraflow's own log lines (the `loraflow.*` loggers: built-in model and dataset builds, the dataset
scan, progress lines) in the Prefect UI's log view.

Only `get_run_logger()`'s loggers are sent to the Prefect API. `send_to_runs` gives the `loraflow`
logger Prefect's API handler, restricted to records made inside a flow or task run: those go to that
run's logs (the task run's, inside a task), as well as to the terminal and log file as before. Records
made outside a run (the CLI before its run, `loraflow plan`) are not sent, and raise none of the
warnings Prefect's handler gives there (why `PREFECT_LOGGING_EXTRA_LOGGERS=loraflow` is not used).
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler


class RunLogHandler(APILogHandler):
    """Prefect's API log handler, for records made inside a flow or task run only."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() or TaskRunContext.get():
            super().emit(record)


def send_to_runs(logger: logging.Logger = logging.getLogger("loraflow")) -> None:
    """Idempotent: `logger`'s records (INFO and up unless its level is set) also go to the current run's logs."""
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(RunLogHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
