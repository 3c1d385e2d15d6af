"""Freed tensor memory goes back to the system (loraflow.host_memory), in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = """
import sys, torch
from loraflow.host_memory import return_freed_memory
if sys.argv[1] == "set":
    assert return_freed_memory()
def rss_mib():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
block = torch.ones(16 << 20, dtype=torch.uint8)
del block  # a mapped block freed: glibc raises its mmap threshold past it
before = rss_mib()
blocks, survivors = [], []
for _ in range(100):
    blocks.append(torch.ones(1 << 20))  # 4 MiB, as a forward pass's activations
    survivors.append(torch.ones(16 << 10))  # 64 KiB after each: the heap cannot shrink past them
del blocks
print(rss_mib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_freed_tensors_go_back_to_the_system():
    # glibc's own defaults: no MALLOC_* variables (Dask's local cluster sets MALLOC_TRIM_THRESHOLD_ in
    # os.environ for its workers, which a test run beside it would inherit).
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}

    def kept_mib(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parents[1], env=env)
        return int(out.stdout.strip().splitlines()[-1])

    assert kept_mib("unset") >= 300  # glibc's default: the heap keeps what the tensors freed
    assert kept_mib("set") <= 50
