"""`loraflow plan`: what a run would do, without running it.

The planner walks the flow's own DAG (`flows.finetune.stages`) in place of the runner that runs
tasks. For each task it computes the cache key exactly as the run would, from the same inputs,
and reads (never deletes) the record at that key:

- a record whose manifest is intact: the stage would be Cached, and what it hands downstream is
  that manifest;
- otherwise the stage would run (Completed), and downstream gets what it would return, by key
  (each task module's `predict`): downstream keys hash only content keys, so they are known
  before anything is computed.

Each stage's "why" compares the content of its key's inputs with the last run recorded in the
store (its run report keeps a hash per input).
"""

from __future__ import annotations

from typing import Any

from prefect import Task
from pydantic import BaseModel

from loraflow.config import RunnerConfig
from loraflow.report import SHARD, Report
from loraflow.store import Store
from tasks.caching import check_record
from tasks.encode_prompts import predict as encode_prompts
from tasks.latent_cache import predict as build_latent_cache
from tasks.null_embedding import predict as null_embedding
from tasks.sample import predict as sample
from tasks.train import predict as train

PREDICT = {  # task name -> what it would return, by key
    "encode-prompts": encode_prompts,
    "build-latent-cache": build_latent_cache,
    "null-embedding": null_embedding,
    "train": train,
    "sample": sample,
}


class PlannedStage(BaseModel):
    label: str  # as in the run report: "encode-prompts[sample prompts]", "build-latent-cache[2/3]"
    state: str  # what Prefect would record: "Cached" or "Completed"
    cache_key: str
    why: str  # "" when Cached


class Planner:
    """Stands in for `StageRunner` in `stages`: records a `PlannedStage` per task run instead of running it."""

    def __init__(self, store: Store, last: Report | None):
        self.store = store
        self.last = {row.label: row for row in last.tasks} if last else None
        self.stages: list[PlannedStage] = []

    def __call__(self, task: Task, **inputs: Any) -> Any:
        policy = task.cache_policy
        key = policy.key_for(task.name, inputs)
        present, manifest, problem = check_record(task, key, self.store)
        label = task.task_run_name.format(**inputs) if isinstance(task.task_run_name, str) else task.name
        if present and not problem:
            self.stages.append(PlannedStage(label=label, state="Cached", cache_key=key, why=""))
            return manifest
        self.stages.append(PlannedStage(label=label, state="Completed", cache_key=key,
                                        why=self.why(label, policy.input_tokens(inputs), problem)))
        return PREDICT[task.name](**inputs)

    def map(self, where: RunnerConfig, *groups: list[tuple[Task, dict[str, Any]]]) -> list[list[Any]]:
        return [[self(task, **inputs) for task, inputs in group] for group in groups]

    def why(self, label: str, tokens: dict[str, str], problem: str | None) -> str:
        if problem:
            return f"its cache record is unusable: {problem}"
        if self.last is None:
            return "no earlier run is recorded in the store"
        before = self.last.get(label)
        if before is None:
            sharded = SHARD.search(label.rstrip("]"))
            return "a shard the last run did not have" if sharded else "the last run did not run this stage"
        changed = [name for name, token in tokens.items() if before.inputs.get(name) != token]
        if changed:
            return "changed since the last run: " + ", ".join(changed)
        return "same inputs as the last run, but its cache record is gone (deleted, or the run did not finish it)"


def plan(cfg) -> list[PlannedStage]:
    """Each stage of a run of `cfg`: its key, whether it would be Cached or run, and why."""
    import logging

    from flows.finetune import read_inputs, stages
    from loraflow.runs import latest_report

    inputs = read_inputs(cfg, logging.getLogger("loraflow.plan"))
    planner = Planner(inputs.store, latest_report(inputs.store))
    stages(cfg, inputs, planner)
    return planner.stages


def table(planned: list[PlannedStage]) -> str:
    width = max([len(p.label) for p in planned] + [4])
    lines = [f"{'task':{width}}  {'would be':10} {'key':12}  why"]
    for p in planned:
        state = "Cached" if p.state == "Cached" else "run"
        lines.append(f"{p.label:{width}}  {state:10} {p.cache_key[:12]}  {p.why}")
    runs = sum(p.state != "Cached" for p in planned)
    lines.append(f"{runs} of {len(planned)} task run(s) would run; the rest are Cached")
    return "\n".join(lines)
