"""What training reports as it goes: every optimizer step's loss, learning rate, gradient norm and
time, kept as rows (checkpoints and the final metrics object in the store hold them), written to
TensorBoard event files, and a progress line every `every` steps with the speed and the time left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

Row = dict[str, float]


class TrainingLog:
    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, tensorboard_dir: Path | None,
                 start: int, total: int, every: int, rows: list[Row] | None = None,
                 progress: Callable[[int], None] | None = None):
        self.logger, self.start, self.total, self.every = logger, start, total, every
        self.progress = progress
        # What the resumed checkpoint saw (without times: those belong to the run that trained them).
        self.rows: list[Row] = [r for r in rows or [] if r["step"] <= start]
        self.began = time.perf_counter()
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a killed run wrote after its last checkpoint are dropped on resume.
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=start + 1)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, images: int) -> None:
        seconds = time.perf_counter() - self.began
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "images": images,
               "seconds": round(seconds, 4)}
        self.rows.append(row)
        if self.writer is not None:
            for name in ("loss", "lr", "grad_norm"):
                self.writer.add_scalar(f"train/{name}", row[name], step)
        if self.progress is not None:
            self.progress(step)
        done = step - self.start
        if step % self.every == 0 or step == self.total:
            rate = done / seconds if seconds > 0 else 0.0
            eta = (self.total - step) / rate if rate else 0.0
            if self.writer is not None:
                self.writer.add_scalar("train/steps_per_second", rate, step)
            self.logger.info("step %d/%d loss %.4f lr %.3g grad norm %.3g | %.2f steps/s, %.1f images/s, ETA %s",
                             step, self.total, loss, lr, grad_norm, rate, rate * images, clock(eta))

    def flush(self) -> None:
        """Called before each checkpoint: what a checkpoint covers is on disk if the run dies next."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"
