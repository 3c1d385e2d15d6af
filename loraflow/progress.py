"""A progress line for long loops: `what: done/total (rate/s, ETA)` at most every few seconds and
at the end, so a run is never silent for longer than that (the model build, the dataset scan,
encoding, sampling; training has its own line, `loraflow.metrics`)."""

from __future__ import annotations

import logging
import time

from loraflow.metrics import clock


class Progress:
    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, what: str, total: int, unit: str = "",
                 every_s: float = 5.0):
        self.logger, self.what, self.total, self.unit, self.every_s = logger, what, total, unit, every_s
        self.done = 0
        self.began = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every_s and self.done < self.total:
            return
        if self.done == self.total and now - self.began < self.every_s:
            return  # a short loop: its summary line says enough
        self.last = now
        rate = self.done / max(now - self.began, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        self.logger.info("%s: %d/%d%s (%.1f/s, ETA %s)", self.what, self.done, self.total, self.unit, rate, clock(eta))
