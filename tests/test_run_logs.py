"""loraflow's own log lines (the built-in model build, the dataset scan) reach the flow run's logs
in the Prefect API, as the UI shows them; outside a run they go nowhere else, without a warning."""

from __future__ import annotations

import logging
import warnings

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker

from loraflow.run_logs import send_to_runs
from tests.helpers import run, small_config


@pytest.mark.slow  # builds the tiny model (its VAE fit takes a minute or two on 2 cores)
def test_model_build_and_dataset_scan_lines_reach_the_flow_runs_logs(shapes, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))  # nothing built, no image known
    with caplog.at_level(logging.INFO, logger="loraflow"):
        report, _ = run(small_config(tmp_path / "store", shapes))
    APILogWorker.drain_all(timeout=30, at_exit=False)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[report.flow_run_id])))
    lines = {(log.name, log.message) for log in logs}
    assert any(name == "loraflow.builtin" and m.startswith("building ") and "tiny-sd" in m for name, m in lines)
    assert any(name == "loraflow.builtin" and m.startswith("built tiny-sd") for name, m in lines)
    images = len(list(shapes.glob("*.png")))
    scan = f": {images} new images checked, 0 known"
    assert any(name == "loraflow.dataset" and m.endswith(scan) for name, m in lines)

    # Progress lines still come at most every 5 s (the last one closes the loop, whenever it ends).
    fit = sorted(log.timestamp for log in logs if log.message.startswith("fitting the tiny VAE: "))
    assert fit and all((b - a).total_seconds() >= 4.9 for a, b in zip(fit[:-2], fit[1:-1]))

    # The terminal and log file get them as before (the same records, through the root logger).
    assert any(r.name == "loraflow.builtin" and r.getMessage().startswith("built tiny-sd") for r in caplog.records)


def test_a_line_outside_a_run_is_not_sent_and_warns_nothing(caplog):
    send_to_runs()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="loraflow"):
        warnings.simplefilter("always")
        logging.getLogger("loraflow.dataset").info("outside any run")
    assert [r.getMessage() for r in caplog.records] == ["outside any run"]
    assert not caught, [str(w.message) for w in caught]
