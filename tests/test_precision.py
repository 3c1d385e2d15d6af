"""How the frozen base is held and the forward pass computed (`loraflow.precision`): a LoRA on a
torchao-quantized base trains in real runs, its linear layers really quantized, and loads into the
family's plain diffusers pipeline; a run raised to more steps resumes bitwise; fp16 mixed precision
scales the loss and resumes with its scale; what cannot train here fails before any task, naming the field.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from loraflow.dataset import generate_shapes
from loraflow.families import get_family
from loraflow.sealed import unsealed_json
from loraflow.store import safetensors_metadata
from tests.helpers import row, run, small_config, user_pipeline

INT8 = {"base_quantization": "int8_weight_only"}  # on a float32 base, no autocast
FLOAT8_BF16 = {"base_quantization": "float8_weight_only", "base_dtype": "bfloat16", "mixed_precision": "bf16"}
INT8_BF16 = {"base_quantization": "int8_weight_only", "base_dtype": "bfloat16", "mixed_precision": "bf16"}


def record_denoiser(monkeypatch, family: str) -> list[dict]:
    """What the denoiser `training_loss` is handed looks like, at every training step."""
    fam = get_family(family)
    training_loss = fam.training_loss
    seen = []

    def recording(denoiser, *args, **kwargs):
        model = getattr(denoiser, "module", denoiser)
        seen.append({
            "base weights": {type(m.weight).__name__ for name, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and ".lora_" not in name},
            "lora layers": {type(m).__name__ for m in model.modules() if isinstance(m, BaseTunerLayer)},
            "trained dtypes": {p.dtype for p in model.parameters() if p.requires_grad},
        })
        return training_loss(denoiser, *args, **kwargs)

    monkeypatch.setattr(fam, "training_loss", recording)
    return seen


def metrics(report) -> list[dict]:
    return json.loads(unsealed_json(Path(report.metrics).read_bytes()))


@pytest.mark.parametrize("family,train,tensor", [("sd", INT8, "Int8Tensor"), ("flux", FLOAT8_BF16, "Float8Tensor")],
                         ids=["sd-int8", "flux-float8-bf16"])
def test_lora_on_a_quantized_base_trains_and_loads_into_the_pipeline(tmp_path, monkeypatch, family, train, tensor):
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config(tmp_path / "store", tmp_path / "data", family,
                       train=train | {"learning_rate": 1e-2, "lr_warmup_steps": 0})
    seen = record_denoiser(monkeypatch, family)
    report, states = run(cfg)
    assert states["train"] == "Completed" and states["sample"] == "Completed"

    # Every step ran on a base whose every linear weight is a torchao tensor, under peft's torchao
    # LoRA layers, the LoRA itself in float32.
    assert len(seen) == cfg.train.steps
    for step in seen:
        assert step == {"base weights": {tensor}, "lora layers": {"TorchaoLoraLinear"}, "trained dtypes": {torch.float32}}
    assert all(math.isfinite(r["loss"]) for r in metrics(report))
    weights = load_file(report.weights)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert all((t != 0).any() for name, t in weights.items() if "lora_B" in name)  # learned (B starts at zero)

    # The LoRA loads into the family's plain (unquantized) pipeline, which then makes the image
    # loraflow sampled (sampling loads the base unquantized too).
    prompt = cfg.sample.prompts[0]
    pipe, generate = user_pipeline(family, cfg)
    before = generate(prompt)
    pipe.load_lora_weights(Path(report.weights).parent, weight_name=Path(report.weights).name)
    after = generate(prompt)
    assert np.abs(after - before).max() > 3
    (ours,) = [u for u in report.samples if Image.open(u).text["prompt"] == prompt]
    assert np.abs(after - np.asarray(Image.open(ours), dtype=np.int16)).max() <= 1


@pytest.mark.slow  # three runs, about a minute and a half on 2 cores
def test_a_quantized_run_raised_to_more_steps_resumes_bitwise(tmp_path):
    """Flux's recipe for a large model: int8 linears, the rest in bf16, bf16 autocast. Six steps, then
    nine resume from the sixth and end where nine uninterrupted steps end, bit for bit."""
    generate_shapes(tmp_path / "data", variants=1)

    def config(store: str, steps: int):
        return small_config(tmp_path / store, tmp_path / "data", "flux", sample={"prompts": []},
                            train=INT8_BF16 | {"steps": steps, "checkpoint_every": 3})

    run(config("store", 6))
    resumed, states = run(config("store", 9))
    assert states["train"] == "Completed"
    assert (row(resumed, "train").reused, row(resumed, "train").computed) == (6, 3)
    fresh, _ = run(config("store-2", 9))
    x, y = load_file(resumed.weights), load_file(fresh.weights)
    assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(fresh)]


@pytest.mark.parametrize("train,message", [
    ({"method": "full", "base_quantization": "int8_weight_only"},
     "train.base_quantization: int8_weight_only is for a frozen base under a LoRA"),
    ({"base_dtype": "float16"}, "train.base_dtype: float16 needs train.mixed_precision: fp16"),
    ({"base_dtype": "float16", "mixed_precision": "bf16"}, "train.base_dtype: float16 needs train.mixed_precision: fp16"),
])
def test_a_base_that_cannot_train_names_the_field(tmp_path, train, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path / "store", tmp_path / "data", train=train)


def test_quantization_without_torchao_names_the_field(tmp_path, monkeypatch):
    generate_shapes(tmp_path / "data", variants=1)
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed: importing it fails
    with pytest.raises(ValueError, match=r"train.base_quantization: int8_weight_only needs torchao: pip install 'loraflow\[quant\]'"):
        run(small_config(tmp_path / "store", tmp_path / "data", train=INT8))
    assert not (tmp_path / "store" / "objects").exists()  # refused before any task ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU fp16 trains (test below)")
def test_fp16_on_a_cpu_names_the_field(tmp_path):
    """accelerate would quietly train in float32 (no fp16 autocast or loss scaling on a CPU)."""
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config(tmp_path / "store", tmp_path / "data", train={"mixed_precision": "fp16", "base_dtype": "float16"})
    with pytest.raises(ValueError, match="train.mixed_precision: fp16 needs a GPU"):
        run(cfg)
    assert not (tmp_path / "store" / "objects").exists()


class Float16OnCpu(Accelerator):
    """accelerate's fp16 as it sets it up on a GPU (autocast in float16 and a GradScaler), on this
    CPU: torch has both on a CPU, accelerate uses neither there. The scale starts so high that the
    first steps overflow."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.mixed_precision == "fp16":
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)


def fp16_run(tmp_path, steps: int, store: str):
    return run(small_config(tmp_path / store, tmp_path / "data", sample={"prompts": []},
                            train={"mixed_precision": "fp16", "steps": steps, "checkpoint_every": 3,
                                   "lr_warmup_steps": 4}))[0]


@pytest.mark.slow  # two to five minutes on 2 cores
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for a GPU's fp16")
def test_fp16_scales_the_loss_skips_overflows_and_resumes_with_its_scale(tmp_path, monkeypatch):
    """The loop's fp16 bookkeeping, through `Float16OnCpu`: the loss is scaled, so the first steps
    overflow and are skipped (the scale halving each time, the LR schedule waiting), gradients are
    unscaled before clipping, the scale is in every checkpoint, and a run raised to more steps
    resumes with it, ending bitwise where an uninterrupted run ends."""
    monkeypatch.setattr("loraflow.training.Accelerator", Float16OnCpu)
    for module in ("loraflow.training", "flows.finetune"):  # no refusing fp16 on this CPU
        monkeypatch.setattr(sys.modules[module], "check_precision", lambda hp, device: None)
    generate_shapes(tmp_path / "data", variants=1)
    fp16_run(tmp_path, 6, "store")
    resumed = fp16_run(tmp_path, 9, "store")
    assert (row(resumed, "train").reused, row(resumed, "train").computed) == (6, 3)
    fresh = fp16_run(tmp_path, 9, "store-2")
    x, y = load_file(resumed.weights), load_file(fresh.weights)
    assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
    assert any((t != 0).any() for name, t in x.items() if "lora_B" in name)  # it learned

    rows = metrics(fresh)
    same = ("step", "loss", "lr", "grad_norm")
    assert [[r[k] for k in same] for r in metrics(resumed)] == [[r[k] for k in same] for r in rows]
    skipped = [r["step"] for r in rows if not math.isfinite(r["grad_norm"])]  # overflowed
    assert skipped[:1] == [1] and len(skipped) < 9
    assert all(r["grad_norm"] < 100 and math.isfinite(r["loss"]) for r in rows if r["step"] not in skipped)  # unscaled
    # The warmup schedule (4 steps from 0 to 1e-3) advances only on the steps taken.
    taken = [sum(1 for s in range(1, r["step"]) if s not in skipped) for r in rows]
    assert [r["lr"] for r in rows] == [1e-3 * min(k / 4.0, 1.0) for k in taken]
    scales = {}  # the GradScaler's state in each checkpoint of the uninterrupted run
    for path in (tmp_path / "store-2" / "objects" / "checkpoints").rglob("*.safetensors"):
        meta = safetensors_metadata(path.read_bytes())
        scales[int(meta["step"])] = dict(json.loads(meta["grad_scaler"])["dict"])["scale"]["value"]
    assert sorted(scales) == [3, 6, 9]
    assert scales[9] == 2.0**24 / 2 ** len(skipped)  # halved once per overflow, not grown since
