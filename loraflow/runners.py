"""The Prefect task runner the sharded stages are submitted to, as `RunnerConfig` says.

Prefect's own runners do the scheduling: a `ThreadPoolTaskRunner` in the flow's process, or
prefect-dask's `DaskTaskRunner` on a Dask cluster (an existing one, or a local one started for the
run). Each shard is a task run of its own wherever it runs: its state is reported to the Prefect
server and its cache record written to the store, so results never depend on where a shard ran.
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from loraflow.config import RunnerConfig


def task_runner(cfg: RunnerConfig) -> TaskRunner:
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RuntimeError("runner.kind: dask needs prefect-dask: pip install 'loraflow[dask]'") from None
    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    # Worker processes with one thread each; Dask's nanny also sets OMP_NUM_THREADS=1 in them, so
    # torch in one worker does not fight the others for cores.
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})
