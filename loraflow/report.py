"""The run report: one row per task run, read from Prefect's task-run states."""

from __future__ import annotations

import time
from typing import Any

from prefect import Task
from pydantic import BaseModel

from loraflow.manifests import Manifest
from loraflow.store import Store


class TaskRow(BaseModel):
    task: str
    role: str | None
    state: str  # Prefect's state name: "Completed" or "Cached"
    cache_key: str
    seconds: float
    computed: int
    reused: int

    @property
    def label(self) -> str:
        return f"{self.task}[{self.role}]" if self.role else self.task


class Report(BaseModel):
    flow_run_id: str
    store: str
    tasks: list[TaskRow] = []
    weights: str | None = None
    samples: list[str] = []

    def table(self) -> str:
        lines = [f"{'task':34} {'state':10} {'computed':>8} {'reused':>7} {'seconds':>8}  key"]
        for r in self.tasks:
            lines.append(f"{r.label:34} {r.state:10} {r.computed:8d} {r.reused:7d} {r.seconds:8.2f}  {r.cache_key[:12]}")
        lines.append(f"weights: {self.weights}")
        lines.append(f"samples: {len(self.samples)} image(s) in {self.store}")
        return "\n".join(lines)

    def markdown(self) -> str:
        rows = ["| task | state | computed | reused | seconds | cache key |", "|---|---|---|---|---|---|"]
        for r in self.tasks:
            rows.append(f"| {r.label} | {r.state} | {r.computed} | {r.reused} | {r.seconds:.2f} | `{r.cache_key[:12]}` |")
        rows += ["", f"weights: `{self.weights}`", "", f"samples: {len(self.samples)} image(s) in `{self.store}`"]
        return "\n".join(rows)


class StageRunner:
    """Runs a task with its cache records in the store and records its report row."""

    def __init__(self, store: Store, report: Report):
        self.store = store
        self.report = report
        self.records = store.prefect_result_storage()

    def __call__(self, task: Task, role: str | None = None, **inputs: Any) -> Any:
        if role is not None:
            inputs["role"] = role
        started = time.perf_counter()
        state = task.with_options(result_storage=self.records)(**inputs, return_state=True)
        result: Manifest = state.result()  # raises the task's error if it failed
        cached = state.name == "Cached"
        self.report.tasks.append(TaskRow(
            task=task.name, role=role, state=state.name,
            cache_key=task.cache_policy.key_for(task.name, inputs),
            seconds=round(time.perf_counter() - started, 3),
            computed=0 if cached else result.computed,
            reused=result.computed + result.reused if cached else result.reused,
        ))
        return result
