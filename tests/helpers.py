"""Running the real flow and reading Prefect's own task-run states back from its API."""

from __future__ import annotations

from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.finetune import finetune
from loraflow.config import RunConfig
from loraflow.report import Report

STAGES = ["captions", "prompts", "null", "latents", "train", "sample"]
TASK_RUN_NAMES = {
    "encode-prompts[captions]": "captions",
    "encode-prompts[sample prompts]": "prompts",
    "null-embedding": "null",
    "build-latent-cache": "latents",
    "train": "train",
    "sample": "sample",
}


FAMILIES = ["sd", "sdxl", "sd3", "flux", "sana"]
T5_OR_GEMMA = ("sd3", "flux", "sana")


def small_config(store: Path, dataset: Path, family: str = "sd", **sections) -> RunConfig:
    """A config that trains and samples in seconds on the tiny model."""
    cfg = {
        "model": {"family": family, "source": f"builtin:tiny-{family}"},
        "dataset": {"source": str(dataset), "resolution": 32},
        "encoder": {"max_length": 16} if family in T5_OR_GEMMA else {},  # CLIP families: 77
        "train": {"steps": 6, "checkpoint_every": 3, "batch_size": 4},
        "sample": {"prompts": ["a red circle", "a blue square"], "steps": 2, "guidance_scale": 3.0},
        "store": str(store),
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return RunConfig.model_validate(cfg)


def run(cfg: RunConfig) -> tuple[Report, dict[str, str]]:
    """Run the flow; return its report and {stage: Prefect state name} read from the API."""
    state = finetune(cfg, return_state=True)
    report: Report = state.result()
    return report, task_states(state.state_details.flow_run_id)


def task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {TASK_RUN_NAMES[r.name]: r.state.name for r in runs}


def report_states(path: Path) -> dict[str, str]:
    """{stage: Prefect state name} from the run report a CLI run wrote with `--report`."""
    report = Report.model_validate_json(path.read_text())
    return {TASK_RUN_NAMES[r.label]: r.state for r in report.tasks}


def row(report: Report, stage: str):
    name = {v: k for k, v in TASK_RUN_NAMES.items()}[stage]
    (match,) = [r for r in report.tasks if r.label == name]
    return match
