"""Bad input: one clear error naming the file or field, and nothing stored is lost or half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.finetune import finetune
from loraflow.dataset import generate_shapes
from tests.helpers import run, small_config, snapshot


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A store holding one complete run, and the dataset it was made from."""
    root = tmp_path_factory.mktemp("bad-input")
    generate_shapes(root / "data", variants=1)
    run(small_config(root / "store", root / "data"))
    return root


@pytest.fixture
def workspace(stored, tmp_path):
    shutil.copytree(stored / "data", tmp_path / "data")
    shutil.copytree(stored / "store", tmp_path / "store")
    return tmp_path


def fails_cleanly(cfg, workspace: Path, *names: str) -> None:
    before = snapshot(workspace / "store")
    with pytest.raises(Exception) as info:
        finetune(cfg)
    message = str(info.value)
    for name in names:
        assert name in message, message
    after = snapshot(workspace / "store")
    assert after == before  # nothing lost, nothing half-written, no temporary files left


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n not really a png"], ids=["empty", "corrupt"])
def test_unreadable_image(workspace, content):
    (workspace / "data" / "green_square_0.png").write_bytes(content)
    cfg = small_config(workspace / "store", workspace / "data")
    fails_cleanly(cfg, workspace, "green_square_0.png")


def test_image_without_caption(workspace):
    (workspace / "data" / "blue_circle_0.txt").unlink()
    cfg = small_config(workspace / "store", workspace / "data")
    fails_cleanly(cfg, workspace, "blue_circle_0.png", "blue_circle_0.txt")


def test_caption_not_utf8(workspace):
    (workspace / "data" / "blue_circle_0.txt").write_bytes(b"a blue \xff circle")
    cfg = small_config(workspace / "store", workspace / "data")
    fails_cleanly(cfg, workspace, "blue_circle_0.txt", "UTF-8")


@pytest.mark.parametrize("line", ['{"file_name": "red_circle_0.png"}', '["red_circle_0.png", "a red circle"]', "{oops"])
def test_bad_metadata_line(workspace, line):
    (workspace / "data" / "metadata.jsonl").write_text(line + "\n")
    cfg = small_config(workspace / "store", workspace / "data")
    fails_cleanly(cfg, workspace, "metadata.jsonl line 1")


def test_cli_bad_yaml_names_the_file(workspace):
    import subprocess
    import sys

    bad = workspace / "run.yaml"
    bad.write_text("train: {steps: [unclosed\n")
    done = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert str(bad) in done.stderr and "Traceback" not in done.stderr


def test_imagefolder_without_caption(workspace):
    (workspace / "data" / "metadata.jsonl").write_text('{"file_name": "red_circle_0.png", "text": "a red circle"}\n')
    cfg = small_config(workspace / "store", workspace / "data")
    fails_cleanly(cfg, workspace, "metadata.jsonl")


def test_unknown_model_path(workspace):
    cfg = small_config(workspace / "store", workspace / "data", model={"source": str(workspace / "no-such-model")})
    fails_cleanly(cfg, workspace, "model.source", "no-such-model")


def test_unreadable_store_url(workspace):
    blocker = workspace / "a-file"
    blocker.write_text("")
    cfg = small_config(blocker / "store", workspace / "data")
    with pytest.raises(Exception) as info:
        finetune(cfg)
    assert "store" in str(info.value) and str(blocker) in str(info.value)
    cfg = small_config("nosuchprotocol://bucket/store", workspace / "data")
    with pytest.raises(Exception, match="store: cannot open 'nosuchprotocol://bucket/store'"):
        finetune(cfg)


def test_empty_sample_prompt_file_trains_without_sampling(workspace):
    prompts = workspace / "prompts.txt"
    prompts.write_text("\n# nothing to sample yet\n\n")
    cfg = small_config(workspace / "store", workspace / "data", sample={"prompts": None, "prompts_file": str(prompts)})
    report, states = run(cfg)
    assert "sample" not in states and "prompts" not in states
    assert states["train"] == "Cached"  # same training inputs as the stored run
    assert report.samples == []
