"""The dataset sensor as a flow, so it can run on a schedule as its own deployment
(`dataset-watch` in deployments/prefect.yaml): each run emits `loraflow.dataset.changed` when the
dataset's listing changed since the last, and `finetune/on-demand`'s trigger retrains."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.finetune import with_deployment_defaults
from loraflow.config import RunConfig
from loraflow.run_logs import send_to_runs
from loraflow.watch import watch


@flow(name="dataset-watch")
def dataset_watch(cfg: RunConfig = RunConfig()) -> bool:
    """Returns whether the event was emitted."""
    send_to_runs()  # a built-in dataset's build lines in this run's logs too
    found = watch(with_deployment_defaults(cfg))  # a partial `cfg` keeps the deployment's other fields
    get_run_logger().info("%s: %s (%d files, fingerprint %s)", found.source,
                          "changed: event emitted" if found.emitted else "unchanged", found.files, found.fingerprint[:12])
    return found.emitted
