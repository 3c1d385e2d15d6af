"""Editing the sample-prompt file while a run trains (kohya-ss sd-scripts #1759) never fails that
run: prompts are read once at flow start, and the next run encodes and samples only the edit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image
from prefect.settings import PREFECT_API_URL

from loraflow.dataset import generate_shapes
from tests.helpers import row, run, small_config
from tests.test_resume import checkpoints_stored


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_prompt_file_edited_during_training(tmp_path, family):
    generate_shapes(tmp_path / "data", variants=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = small_config(tmp_path / "store", tmp_path / "data", family, train={"steps": 200, "checkpoint_every": 20},
                       sample={"prompts": None, "prompts_file": str(prompts)})
    (tmp_path / "run.yaml").write_text(json.dumps(cfg.model_dump()))

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraflow.cli", "run", "--config", str(tmp_path / "run.yaml"),
         "--report", str(tmp_path / "first.json")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while checkpoints_stored(tmp_path / "store") < 1 and proc.poll() is None:
        time.sleep(0.05)
    prompts.write_text("a red circle\na blue square --w 512\n")  # the edit from #1759, mid-training
    assert proc.poll() is None, "the edit must land while the run is training"
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]

    first = json.loads((tmp_path / "first.json").read_text())
    assert sorted(Image.open(u).text["prompt"] for u in first["samples"]) == ["a blue square", "a red circle"]

    report, states = run(cfg)
    assert states["train"] == "Cached"
    assert (states["prompts"], row(report, "prompts").computed) == ("Completed", 1)
    assert (states["sample"], row(report, "sample").computed, row(report, "sample").reused) == ("Completed", 1, 1)
