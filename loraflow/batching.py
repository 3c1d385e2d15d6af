"""Fixed-shape batches for the encoders, and work overlapped with them.

Every forward pass of an encoder has the same batch shape (`padded_pass`): the last batch is padded
by repeating its last item, and only the real items' outputs are kept. Kernels (oneDNN, cuDNN, cuBLAS) are
chosen per input shape and each sample's arithmetic does not depend on the other samples in the
pass, so an item's output depends on the item and the batch size alone: not on its batch mates,
nor on how many items were already stored. (It does depend on the batch size, as on the device
and thread count: a different shape can pick a different kernel, which rounds differently.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
import multiprocessing
import signal
import sys
import threading
from typing import TypeVar

import torch

from loraflow.children import die_with_parent

T = TypeVar("T")
R = TypeVar("R")

CPU_BATCH = 8  # items per forward pass on a CPU, images and prompts alike
GPU_IMAGE_BATCH = 16  # VAE passes on a GPU: 16 SDXL-VAE images of 1024 px take about 40 GB in fp32
GPU_PROMPT_BATCH = 64  # text-encoder passes on a GPU: prompts are short next to images


def batch_size_for(configured: int | None, device: torch.device, gpu_default: int) -> int:
    """The configured batch size, or the default for the device (CPU_BATCH on a CPU)."""
    if configured:
        return configured
    return CPU_BATCH if device.type == "cpu" else gpu_default


# Set when the run is told to stop (the CLI's SIGINT/SIGTERM handler). A signal interrupts only the
# main thread; shards encoding in worker threads stop at their next batch, as an interrupt, so
# Prefect marks them Crashed too.
STOP = threading.Event()


def check_stop() -> None:
    """Raise KeyboardInterrupt if the run was told to stop (`STOP`): called between batches."""
    if STOP.is_set():
        raise KeyboardInterrupt("the run was stopped")


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """`items` in order, `size` at a time (the last chunk may be shorter)."""
    for start in range(0, len(items), size):
        check_stop()
        yield list(items[start : start + size])


def padded_pass(forward: Callable[[list[T]], Sequence[R]], inputs: list[T], size: int) -> list[R]:
    """`forward` over `inputs` (at most `size` of them) padded to exactly `size` by repeating the
    last one, so every pass has the same shape; the outputs of the real inputs."""
    if not 0 < len(inputs) <= size:
        raise ValueError(f"a pass takes 1 to {size} inputs, not {len(inputs)}")
    outputs = forward(inputs + [inputs[-1]] * (size - len(inputs)))
    return list(outputs[: len(inputs)])


# Threads reading, cutting and writing beside the encoder where no helper process may be started
# (`worker_pool`). On local disks that work is mostly Python holding the GIL, which the encoder
# needs between its kernels: one thread overlaps what releases it (decoding, hashing, file I/O) and
# a second only slows the encoder (bench/latent_throughput.py, stop 18: 0.81x the bare loop with one,
# 0.73x with two). Reads and writes over a network wait instead, so there are two.
LOCAL_IO_THREADS = 1
REMOTE_IO_THREADS = 2


def io_threads(*remote: bool) -> int:
    """The worker threads for a stage whose inputs and outputs are on these filesystems (True: remote)."""
    return REMOTE_IO_THREADS if any(remote) else LOCAL_IO_THREADS


@contextmanager
def worker_pool(workers: int, processes: bool = False) -> Iterator[Executor]:
    """`workers` threads, or helper processes (where `may_start_processes`), working beside the
    encoder. Helpers are forked: they start with this process's memory (the store, the digests'
    location) and nothing to import. On an error or a signal, work not yet started is dropped
    rather than waited for."""
    if processes:
        pool: Executor = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), initializer=_helper_started)
    else:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="loraflow-io")
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def may_start_processes() -> bool:
    """Whether helper processes may be used: on Linux (forked, and dying with the run), and not
    inside a daemon process, such as a Dask worker, which may not start processes of its own."""
    return sys.platform == "linux" and not multiprocessing.current_process().daemon


def _helper_started() -> None:
    """In a helper process: leave SIGINT (a terminal's Ctrl-C reaches the whole group) to the run,
    which stops its helpers, and die with the thread that started it, so a killed run leaves none."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
