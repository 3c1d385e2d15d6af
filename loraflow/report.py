"""The run report: one row per task run, read from Prefect's task-run states."""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from typing import Any

import cloudpickle
from prefect import Task
from prefect.client.schemas.objects import State
from prefect.task_runners import TaskRunner
from pydantic import BaseModel

from loraflow.batching import STOP
from loraflow.config import RunnerConfig
from loraflow.manifests import Manifest
from loraflow.runners import task_runner
from loraflow.store import Store


SHARD = re.compile(r"\s*\b\d+/\d+$")  # "3/16" at the end of a role: one shard of a sharded stage


class TaskRow(BaseModel):
    task: str
    role: str | None  # what the task run name has in brackets: "sample prompts", "captions 3/16", "3/16"
    state: str  # Prefect's state name: "Completed" or "Cached"
    cache_key: str
    seconds: float
    computed: int
    reused: int
    input_bytes: int  # the task's inputs pickled, as a Dask or process runner ships them: small at any dataset size
    inputs: dict[str, str] = {}  # {input name: hash of its content} of the inputs in the key (`loraflow plan`)

    @property
    def label(self) -> str:
        return f"{self.task}[{self.role}]" if self.role else self.task

    @property
    def stage(self) -> str:
        """The label without the shard: "encode-prompts[captions]", "build-latent-cache"."""
        role = SHARD.sub("", self.role or "")
        return f"{self.task}[{role}]" if role else self.task


class SampleRow(BaseModel):
    prompt: str
    step: int  # the training step whose weights made it
    index: int  # of `sample.images_per_prompt`
    url: str


class Report(BaseModel):
    flow_run_id: str
    store: str
    family: str | None = None
    method: str | None = None  # "lora" or "full"
    final_step: int | None = None
    started: str | None = None  # ISO 8601, UTC
    finished: str | None = None
    tasks: list[TaskRow] = []
    weights: str | None = None
    ema_weights: str | None = None  # the EMA of the final weights (train.ema_decay)
    metrics: str | None = None  # every training step's loss, learning rate, gradient norm and time (JSON)
    samples: list[str] = []
    sample_images: list[SampleRow] = []  # the samples with their prompt and step

    def stages(self) -> list[tuple[str, str, int, int, float, str]]:
        """One line per stage: (label, state, computed, reused, seconds, cache key). A sharded
        stage's shards are summed ("Completed 1, Cached 15"; the slowest shard's seconds)."""
        groups: dict[str, list[TaskRow]] = {}
        for r in self.tasks:
            groups.setdefault(r.stage if SHARD.search(r.role or "") else r.label, []).append(r)
        lines = []
        for label, rows in groups.items():
            if len(rows) == 1:
                r = rows[0]
                lines.append((r.label, r.state, r.computed, r.reused, r.seconds, r.cache_key[:12]))
                continue
            states = ", ".join(f"{s} {n}" for s, n in sorted(Counter(r.state for r in rows).items(), reverse=True))
            lines.append((f"{label} ×{len(rows)} shards", states, sum(r.computed for r in rows),
                          sum(r.reused for r in rows), max(r.seconds for r in rows), ""))
        return lines

    def table(self) -> str:
        lines = [f"{'task':40} {'state':12} {'computed':>8} {'reused':>7} {'seconds':>8}  key"]
        for label, state, computed, reused, seconds, key in self.stages():
            lines.append(f"{label:40} {state:12} {computed:8d} {reused:7d} {seconds:8.2f}  {key}")
        lines.append(f"weights: {self.weights}")
        if self.ema_weights:
            lines.append(f"EMA weights: {self.ema_weights}")
        lines.append(f"metrics: {self.metrics}")
        lines.append(f"samples: {len(self.samples)} image(s) in {self.store}")
        return "\n".join(lines)

    def markdown(self) -> str:
        rows = ["| task | state | computed | reused | seconds | cache key |", "|---|---|---|---|---|---|"]
        for label, state, computed, reused, seconds, key in self.stages():
            rows.append(f"| {label} | {state} | {computed} | {reused} | {seconds:.2f} | `{key}` |")
        rows += ["", f"weights: `{self.weights}`", "", f"samples: {len(self.samples)} image(s) in `{self.store}`"]
        return "\n".join(rows)


def stage_tags(name: str) -> set[str]:
    """The tags of stage `name`'s task runs when `runner.tags` is on: for a tag concurrency limit
    ("one train at a time") or a UI filter. Off by default: Prefect then makes a concurrency-slot
    API call (a write transaction on its database) for every task run, even with no limit set."""
    return {"loraflow", f"stage:{name}"}


STOP_WAIT_S = 30  # how long a stopped run waits for each shard still running to end


class StageRunner:
    """Runs tasks with their cache records in the store and records a report row per task run."""

    def __init__(self, store: Store, report: Report, tags: bool = False):
        self.store = store
        self.report = report
        self.records = store.prefect_result_storage()
        self.tags = tags  # `runner.tags`: tag each task run by its stage

    def _configured(self, task: Task) -> Task:
        """`task` with its cache records in the store (and its stage tags, when asked for)."""
        return task.with_options(result_storage=self.records, **({"tags": stage_tags(task.name)} if self.tags else {}))

    def __call__(self, task: Task, **inputs: Any) -> Any:
        """Run `task` here, now, and return its manifest (raising its error if it failed)."""
        started = time.perf_counter()
        state = self._configured(task)(**inputs, return_state=True)
        return self._row(task, inputs, state, time.perf_counter() - started)

    def map(self, where: RunnerConfig, *groups: list[tuple[Task, dict[str, Any]]]) -> list[list[Any]]:
        """Submit every (task, inputs) of every group at once to the task runner `where` says
        (threads, or Dask workers), wait for all, and return each group's manifests in order. A
        row's seconds run from the submission to when that task run finished."""
        with task_runner(where) as runner:
            return self._map(runner, groups)

    def _map(self, runner: TaskRunner, groups) -> list[list[Any]]:
        started = time.perf_counter()
        submitted = [[(task, inputs, runner.submit(self._configured(task), inputs))
                      for task, inputs in group] for group in groups]
        finished = {}
        try:
            for group in submitted:
                for _, _, future in group:
                    future.wait()
                    finished[id(future)] = time.perf_counter() - started
        except BaseException:  # stopped (a signal reaches only this thread): let the shards end first
            STOP.set()  # in threads they stop at their next batch, and Prefect records them Crashed
            try:
                for group in submitted:
                    for _, _, future in group:
                        with contextlib.suppress(BaseException):  # a shard's own interrupt: the stop raised here wins
                            future.wait(timeout=STOP_WAIT_S)
            finally:
                STOP.clear()
            raise
        return [[self._row(task, inputs, future.state, finished[id(future)]) for task, inputs, future in group]
                for group in submitted]

    def _row(self, task: Task, inputs: dict[str, Any], state: State, seconds: float) -> Any:
        result: Manifest = state.result()  # raises the task's error if it failed
        cached = state.name == "Cached"
        name = task.task_run_name.format(**inputs) if isinstance(task.task_run_name, str) else task.name
        self.report.tasks.append(TaskRow(
            task=task.name, role=name[len(task.name) + 1 : -1] or None, state=state.name,
            cache_key=task.cache_policy.key_for(task.name, inputs),
            seconds=round(seconds, 3),
            computed=0 if cached else result.computed,
            reused=result.computed + result.reused if cached else result.reused,
            input_bytes=len(cloudpickle.dumps(inputs)),
            inputs=task.cache_policy.input_tokens(inputs),
        ))
        return result
