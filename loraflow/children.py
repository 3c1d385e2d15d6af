"""Processes loraflow starts (training ranks, a Prefect server, helper processes) die with the one
that started them, so a run killed even by SIGKILL leaves none behind."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In a child process: have the kernel send it `signum` when the thread that started it ends
    (with its process, however that dies). Linux only; elsewhere nothing happens."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
