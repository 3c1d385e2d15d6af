"""What training reports as it goes: every optimizer step's loss, learning rate, gradient norm and
time, kept as rows (checkpoints and the final metrics object in the store hold them), written to
TensorBoard event files and, when `train.wandb_project` is set, to a Weights & Biases run, and a
progress line every `every` steps with the speed and the time left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, float]


class TrainingLog:
    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, tensorboard_dir: Path | None,
                 start: int, total: int, every: int, rows: list[Row] | None = None,
                 progress: Callable[[int], None] | None = None, wandb_run: Any = None):
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
        self.wandb = wandb_run  # a W&B run (`start_wandb_run`): finished by `close`

    def step(self, step: int, loss: float, lr: float, grad_norm: float, images: int) -> None:
        seconds = time.perf_counter() - self.began
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "images": images,
               "seconds": round(seconds, 4)}
        self.rows.append(row)
        scalars = {f"train/{name}": row[name] for name in ("loss", "lr", "grad_norm")}
        if self.progress is not None:
            self.progress(step)
        done = step - self.start
        if step % self.every == 0 or step == self.total:
            rate = done / seconds if seconds > 0 else 0.0
            eta = (self.total - step) / rate if rate else 0.0
            scalars["train/steps_per_second"] = rate
            self.logger.info("step %d/%d loss %.4f lr %.3g grad norm %.3g | %.2f steps/s, %.1f images/s, ETA %s",
                             step, self.total, loss, lr, grad_norm, rate, rate * images, clock(eta))
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            # A resumed run logs again the steps a killed one logged after its last checkpoint: W&B
            # keeps the first (the same values: a resume is bitwise) and warns.
            self.wandb.log(scalars, step=step)

    def flush(self) -> None:
        """Called before each checkpoint: what a checkpoint covers is on disk if the run dies next."""
        if self.writer is not None:
            self.writer.flush()

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)

    def __enter__(self) -> "TrainingLog":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=error is not None)


def import_wandb():
    """wandb, or one error naming the option that asked for it."""
    try:
        import wandb
    except ImportError:
        raise ValueError("train.wandb_project: Weights & Biases logging needs wandb: "
                         "pip install 'loraflow[wandb]'") from None
    return wandb


def start_wandb_run(project: str, run_key: str, config: dict[str, Any]):
    """The W&B run of a training run: its id is the run key's first 16 hex digits, so a killed run
    resumed (the same key) goes on in the same W&B run."""
    wandb = import_wandb()
    return wandb.init(project=project, id=run_key[:16], name=f"loraflow-{run_key[:12]}", config=config,
                      resume="allow", reinit="create_new",  # its own run, even beside another in this process
                      settings=wandb.Settings(console="off"))  # the task's log lines stay the task's


def clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"
