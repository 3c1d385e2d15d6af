"""The change matrix: after a full first run, change one thing and check which stages re-run.

States are Prefect's own task-run states, read back from the API for real flow runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file

from loraflow.builtin import builtin_path
from loraflow.dataset import draw_shape
from tests import helpers
from tests.helpers import FAMILIES, STAGES, report_states, row, small_config, stored_latents

C, R = "Cached", "Completed"
ALL = pytest.mark.parametrize("baseline", FAMILIES, indirect=True)  # rows that hold for every family
SD = pytest.mark.parametrize("baseline", ["sd"], indirect=True)
SDXL = pytest.mark.parametrize("baseline", ["sdxl"], indirect=True)
FLUX = pytest.mark.parametrize("baseline", ["flux"], indirect=True)


def run(cfg):
    """Every row of the matrix also checks `loraflow plan`: its Cached-or-run and key for every
    task run equal the Prefect states and keys the run then records."""
    return helpers.run(cfg, check_plan=True)


def expect(**changed: str) -> dict[str, str]:
    return {stage: changed.get(stage, C) for stage in STAGES}


def perturb(model_dir: Path, folder: str) -> None:
    (weights,) = (model_dir / folder).glob("*.safetensors")
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)


@pytest.fixture(scope="module")
def baseline(request, tmp_path_factory):
    """One full run of the tiny model on a copy of the model folder and a generated dataset."""
    family = request.param
    root = tmp_path_factory.mktemp(f"baseline-{family}")
    model = root / "model"
    shutil.copytree(builtin_path(f"tiny-{family}"), model)
    from loraflow.dataset import generate_shapes

    generate_shapes(root / "data", variants=1)
    cfg = small_config(root / "store", root / "data", family, model={"source": str(model)})
    report, states = run(cfg)
    assert states == expect(**{s: R for s in STAGES})
    return root, cfg


def fork(baseline, tmp_path):
    """A private copy of the baseline's store, dataset and model, and a config pointing at it."""
    root, cfg = baseline
    for part in ("store", "data", "model"):
        shutil.copytree(root / part, tmp_path / part)
    data = cfg.model_dump()
    data["store"] = str(tmp_path / "store")
    data["dataset"]["source"] = str(tmp_path / "data")
    data["model"]["source"] = str(tmp_path / "model")
    return tmp_path, data


@ALL
def test_nothing_changed(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect()
    assert all(r.computed == 0 for r in report.tasks)


@ALL
def test_one_sample_prompt_edited(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    cfg["sample"]["prompts"] = ["a red circle", "a yellow circle on grass"]
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(prompts=R, sample=R)
    assert (row(report, "prompts").computed, row(report, "prompts").reused) == (1, 1)
    assert (row(report, "sample").computed, row(report, "sample").reused) == (1, 1)


@SD
@pytest.mark.parametrize("setting,value", [("steps", 3), ("guidance_scale", 5.0), ("seed", 7)])
def test_sampler_setting_changed(baseline, tmp_path, setting, value):
    root, cfg = fork(baseline, tmp_path)
    cfg["sample"][setting] = value
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(sample=R)
    assert row(report, "sample").computed == 2


@ALL
def test_one_caption_edited(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    (root / "data" / "red_circle_0.txt").write_text("a crimson circle\n")
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(captions=R, train=R, sample=R)
    assert row(report, "captions").computed == 1


@ALL
def test_one_image_added(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    draw_shape("red", "square", 2).save(root / "data" / "red_square_9.png")
    (root / "data" / "red_square_9.txt").write_text("a big red square\n")
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(captions=R, latents=R, train=R, sample=R)
    assert row(report, "captions").computed == 1
    assert row(report, "latents").computed == 1


@ALL
def test_learning_rate_changed(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    cfg["train"]["learning_rate"] = 5e-4
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(train=R, sample=R)


@SD
def test_text_encoder_weights_changed(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    perturb(root / "model", "text_encoder")
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(captions=R, prompts=R, null=R, train=R, sample=R)


@SD
def test_vae_weights_changed(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    perturb(root / "model", "vae")
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(latents=R, train=R, sample=R)


@SD
def test_same_store_fresh_prefect_database(baseline, tmp_path):
    """A new process with its own Prefect home (an embedded server on a new database), via the CLI."""
    root, cfg = fork(baseline, tmp_path)
    (root / "run.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "fresh-prefect-home")
    done = subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "run", "--config", str(root / "run.yaml"), "--report", str(root / "r.json")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "fresh-prefect-home" / "prefect.db").exists()
    assert report_states(root / "r.json") == expect()  # every task Cached


@pytest.mark.parametrize("baseline", ["sd", "sdxl"], indirect=True)
@pytest.mark.parametrize("setting,value", [("flip", True), ("center_crop", False), ("resolution", 64)])
def test_latent_settings_changed(baseline, tmp_path, setting, value):
    root, cfg = fork(baseline, tmp_path)
    cfg["dataset"][setting] = value
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(latents=R, train=R, sample=R)
    images = len(list((root / "data").glob("*.png")))
    assert (row(report, "latents").computed, row(report, "latents").reused) == (images, 0)


@SD
def test_caption_dropout_always_gets_the_null_embedding(baseline, tmp_path):
    """Sana #216: the null embedding was only written when sampling was on. Here caption dropout
    alone asks for it, with no sample prompts and nothing to switch it off."""
    root, cfg = fork(baseline, tmp_path)
    cfg["train"]["caption_dropout"] = 0.5
    cfg["sample"]["prompts"] = []
    shutil.rmtree(root / "store" / "objects" / "null")  # as if no earlier run had made it
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == {"captions": C, "null": R, "latents": C, "train": R}
    assert row(report, "null").computed == 1


@SD
def test_intermediate_checkpoint_sampled(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    cfg["sample"]["checkpoints"] = [3]
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(sample=R)
    assert (row(report, "sample").computed, row(report, "sample").reused) == (2, 2)
    steps = sorted(int(Image.open(u).text["step"]) for u in report.samples)
    assert steps == [3, 3, 6, 6]
    by_step = {(Image.open(u).text["prompt"], Image.open(u).text["step"]): np.asarray(Image.open(u)) for u in report.samples}
    assert not np.array_equal(by_step["a red circle", "3"], by_step["a red circle", "6"])


def test_sample_checkpoint_must_exist(tmp_path):
    with pytest.raises(ValueError, match="sample.checkpoints: step 4 is not a checkpoint"):
        small_config(tmp_path / "store", tmp_path, sample={"checkpoints": [4]})


@SD
def test_image_renamed_changes_nothing(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    (root / "data" / "red_circle_0.png").rename(root / "data" / "zz_renamed.png")
    (root / "data" / "red_circle_0.txt").rename(root / "data" / "zz_renamed.txt")
    _, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect()


@SD
def test_training_longer_resumes_from_the_shorter_run(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    cfg["train"]["steps"] = 9
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(train=R, sample=R)
    assert (row(report, "train").reused, row(report, "train").computed) == (6, 3)


@SD
def test_training_longer_under_a_decaying_schedule_starts_over(baseline, tmp_path):
    """A cosine schedule's learning rate at step 3 depends on the run's length: a 9-step run cannot
    resume from a 6-step one's checkpoints."""
    root, cfg = fork(baseline, tmp_path)
    cfg["train"]["lr_scheduler"] = "cosine"
    run(type(baseline[1]).model_validate(cfg))
    cfg["train"]["steps"] = 9
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(train=R, sample=R)
    assert (row(report, "train").reused, row(report, "train").computed) == (0, 9)


# Each changes what training learns: train and sample re-run, nothing upstream.
TRAINING_OPTIONS = [
    ("lr_scheduler", "cosine"), ("lr_warmup_steps", 0), ("gradient_accumulation_steps", 2), ("max_grad_norm", None),
    ("optimizer", "prodigy"), ("weight_decay", 0.0), ("snr_gamma", 5.0), ("noise_offset", 0.05), ("ema_decay", 0.9),
    ("lora_targets", "attention_mlp"), ("use_dora", True), ("rank_pattern", {"to_q": 2}), ("alpha_pattern", {"to_q": 8.0}),
    ("adapter", "lokr"), ("adapter", "loha"),
]


@SD
@pytest.mark.parametrize("setting,value", TRAINING_OPTIONS)
def test_training_option_changed(baseline, tmp_path, setting, value):
    _, cfg = fork(baseline, tmp_path)
    cfg["train"][setting] = value
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(train=R, sample=R)
    assert row(report, "train").reused == 0


@SD
def test_bfloat16_base_changed(baseline, tmp_path):
    """`train.base_dtype` alone (bf16 autocast in both runs) re-runs train and sample; the LoRA
    trained on the bf16 base is stored in float32."""
    _, cfg = fork(baseline, tmp_path)
    cfg["train"]["mixed_precision"] = "bf16"
    run(type(baseline[1]).model_validate(cfg))
    cfg["train"]["base_dtype"] = "bfloat16"
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(train=R, sample=R)
    weights = load_file(report.weights)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in weights.values())


@SD
def test_quantized_base_changed(baseline, tmp_path):
    """`train.base_quantization` re-runs train and sample only; the LoRA trained on the int8 base is
    stored in float32 and sampled on the plain base."""
    _, cfg = fork(baseline, tmp_path)
    cfg["train"]["base_quantization"] = "int8_weight_only"
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(train=R, sample=R)
    assert row(report, "train").reused == 0
    weights = load_file(report.weights)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in weights.values())


# How training runs, not what it learns: nothing re-runs.
@SD
@pytest.mark.parametrize("setting,value", [("gradient_checkpointing", True), ("log_every", 1), ("data_cache_mb", 1),
                                           ("tensorboard_dir", ""), ("wandb_project", "loraflow-test")])
def test_training_runtime_option_changed(baseline, tmp_path, setting, value):
    _, cfg = fork(baseline, tmp_path)
    cfg["train"][setting] = value
    _, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect()


@SD
def test_encoder_dtype_changed(baseline, tmp_path):
    root, cfg = fork(baseline, tmp_path)
    cfg["encoder"]["dtype"] = "bfloat16"
    _, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(captions=R, prompts=R, null=R, train=R, sample=R)


@FLUX
def test_flux_t5_attention_mask_toggled(baseline, tmp_path):
    """The mask changes every T5 embedding: encodes, null embedding, train and sample re-run; latents do not."""
    root, cfg = fork(baseline, tmp_path)
    cfg["encoder"]["t5_attention_mask"] = True
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(captions=R, prompts=R, null=R, train=R, sample=R)
    assert row(report, "captions").reused == 0
    assert row(report, "latents").computed == 0


@SDXL
def test_sdxl_crop_coordinates_reach_time_ids(baseline, tmp_path, monkeypatch):
    """The size and crop stored with each latent are what the UNet receives as `time_ids` in training,
    and changing the crop setting re-encodes the latents."""
    root, cfg = fork(baseline, tmp_path)
    draw_shape("red", "circle", 1).resize((96, 64)).save(root / "data" / "wide_red_circle.png")  # cropped sideways
    (root / "data" / "wide_red_circle.txt").write_text("a wide red circle\n")
    cfg["train"]["batch_size"] = 16  # more than the images: every step sees every latent
    cfg["dataset"]["buckets"] = False  # every image cut square (buckets: tests/test_buckets.py)

    seen = []
    forward = UNet2DConditionModel.forward

    def recording_forward(self, *args, added_cond_kwargs=None, **kwargs):
        if torch.is_grad_enabled():  # training, not sampling
            seen.extend(tuple(row) for row in added_cond_kwargs["time_ids"].round().int().tolist())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    for center_crop, states_expected in [(True, expect(captions=R, latents=R, train=R, sample=R)),
                                         (False, expect(latents=R, train=R, sample=R))]:
        cfg["dataset"]["center_crop"] = center_crop
        seen.clear()
        config = type(baseline[1]).model_validate(cfg)
        report, states = run(config)
        assert states == states_expected
        stored = stored_latents(config)
        resolution = config.dataset.resolution
        expected = {(*t["original_size"].tolist(), *t["crop_top_left"].tolist(), resolution, resolution) for t in stored}
        assert set(seen) == expected
        assert ((64, 96, 0, 8, 32, 32) in expected) == center_crop  # the wide image, resized to 48x32


@pytest.mark.parametrize("baseline", ["sd3"], indirect=True)
@pytest.mark.parametrize("setting,value", [("weighting_scheme", "mode"), ("logit_std", 0.5), ("precondition_outputs", False)])
def test_timestep_weighting_changed(baseline, tmp_path, setting, value):
    _, cfg = fork(baseline, tmp_path)
    cfg["train"][setting] = value
    _, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(train=R, sample=R)


@FLUX
def test_flux_sampling_guidance_embedding_changed(baseline, tmp_path):
    _, cfg = fork(baseline, tmp_path)
    cfg["sample"]["guidance_embedding"] = 5.0
    report, states = run(type(baseline[1]).model_validate(cfg))
    assert states == expect(sample=R)
    assert row(report, "sample").computed == 2
