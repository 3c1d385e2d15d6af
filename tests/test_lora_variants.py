"""LoRA variants (target presets, per-layer rank, DoRA): what training exports is what a diffusers
pipeline loads with `load_lora_weights`, every layer of it. LoHa and LoKr (`train.adapter`): real
runs train and sample with them, their stored file is peft's state dict and config (safetensors and
JSON) that plain peft puts back, resuming is bitwise, and the kohya export is LyCORIS' layout of the
same weight updates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors

from loraflow.builtin import builtin_path
from loraflow.config import TrainConfig
from loraflow.dataset import generate_shapes
from loraflow.export import export, lycoris_to_kohya
from loraflow.families import get_family
from loraflow.sealed import KEY_FIELD
from loraflow.store import Store, safetensors_metadata
from loraflow.weights import apply_weights, export_weights
from tests.helpers import FAMILIES, resample, row, run, small_config

VARIANTS = {
    "attention_mlp": {"lora_targets": "attention_mlp"},
    "all_linear": {"lora_targets": "all_linear"},
    "conv": {"lora_targets": "conv"},
    "dora": {"lora_targets": "attention_mlp", "use_dora": True},
    "rank_pattern": {"rank": 4, "rank_pattern": {"to_q": 2}, "alpha_pattern": {"to_q": 8.0}},
    "loha": {"adapter": "loha", "lora_targets": "attention_mlp", "rank_pattern": {"to_q": 2}, "alpha_pattern": {"to_q": 8.0}},
    "lokr": {"adapter": "lokr", "lora_targets": "attention_mlp", "decompose_both": True, "rank": 2},
}
HAS_RESNETS = {"sd", "sdxl"}


def trained(family: str, hp: TrainConfig) -> torch.nn.Module:
    """The family's denoiser with the adapter, its weights set to random values (as if trained)."""
    fam = get_family(family)
    denoiser = fam.load_denoiser(str(builtin_path(f"tiny-{family}")))
    denoiser.requires_grad_(False)
    fam.add_lora(denoiser, hp)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "magnitude" in name else 0.0))
    return denoiser


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_variant_loads_whole(family, variant):
    hp = TrainConfig(**VARIANTS[variant])
    fam = get_family(family)
    if variant == "conv" and family not in HAS_RESNETS:
        with pytest.raises(ValueError, match="train.lora_targets: conv"):
            trained(family, hp)
        return
    denoiser = trained(family, hp)
    ours = get_peft_model_state_dict(denoiser)
    targets = fam.lora_target_modules(denoiser, hp.lora_targets)
    assert len(ours) >= 2 * len(fam.lora_targets)

    pipe = fam.pipeline(str(builtin_path(f"tiny-{family}")), fam.load_denoiser(str(builtin_path(f"tiny-{family}"))),
                        fam.load_vae(str(builtin_path(f"tiny-{family}")), torch.device("cpu")))
    apply_weights(pipe, fam, "lora", export_weights(fam, denoiser, "lora"))
    loaded = get_peft_model_state_dict(getattr(pipe, fam.denoiser_folder), adapter_name=next(
        iter(getattr(pipe, fam.denoiser_folder).peft_config)))
    assert loaded.keys() == ours.keys()
    for name in ours:
        assert torch.equal(loaded[name], ours[name]), name

    if variant == "rank_pattern":
        q = next(v for k, v in ours.items() if k.endswith("to_q.lora_A.weight"))
        k = next(v for k, v in ours.items() if k.endswith("to_k.lora_A.weight"))
        assert (q.shape[0], k.shape[0]) == (2, 4)
    if variant == "dora":
        assert any("lora_magnitude_vector" in name for name in ours)
    if variant == "conv":
        assert any(".resnets." in t for t in targets)
        assert any(".resnets." in name and name.endswith("conv1.lora_A.weight") for name in ours)
    if variant == "all_linear":
        fresh = fam.load_denoiser(str(builtin_path(f"tiny-{family}")))
        linear = sum(isinstance(m, torch.nn.Linear) for m in fresh.modules())
        assert len({name.split(".lora_")[0] for name in ours}) == linear > len(fam.lora_targets)
    if variant in ("loha", "lokr"):  # peft's own tensors, no LoRA ones
        assert all(name.rsplit(".", 1)[1].startswith(("hada_", "lokr_")) for name in ours)


# --- LoHa and LoKr in real runs ------------------------------------------------------------------

# The tiny Flux needs a larger step before its adapter moves the 8-bit image at all.
LEARNING_RATES = {"sd": 1e-2, "flux": 1e-1}


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_lycoris_adapter_trains_samples_and_loads_back_with_peft(tmp_path, family, adapter):
    generate_shapes(tmp_path / "data", variants=1)
    cfg = small_config(tmp_path / "store", tmp_path / "data", family,
                       train={"adapter": adapter, "alpha": 2.0, "learning_rate": LEARNING_RATES[family],
                              "lr_warmup_steps": 0})
    report, states = run(cfg)
    assert states["train"] == "Completed" and states["sample"] == "Completed"

    # The stored file: safetensors whose header holds peft's config as JSON (and the store's key).
    data = Path(report.weights).read_bytes()
    tensors, header = load_safetensors(data), safetensors_metadata(data)
    assert set(header) == {"format", "peft_config", KEY_FIELD}
    fields = json.loads(header["peft_config"])
    assert (fields["peft_type"], fields["r"], fields["alpha"]) == (adapter.upper(), 4, 2.0)
    assert tensors and all(k.rsplit(".", 1)[1].startswith(("hada_", "lokr_")) for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float32}

    # Put back with plain peft into a freshly loaded denoiser: the run's own sample...
    fam = get_family(family)
    path = str(builtin_path(f"tiny-{family}"))
    denoiser = fam.load_denoiser(path)
    inject_adapter_in_model(PeftConfig.from_peft_type(**fields), denoiser)
    result = set_peft_model_state_dict(denoiser, tensors)
    assert not result.unexpected_keys
    pipe = fam.pipeline(path, denoiser.eval(), fam.load_vae(path, torch.device("cpu")))
    pipe.set_progress_bar_config(disable=True)
    image, sampled = resample(cfg, report, pipe)
    assert np.abs(image - sampled).max() <= 1  # the same image, to 8-bit rounding

    # ...which the base model's sample is not: the adapter learned something that shows.
    pipe = fam.pipeline(path, fam.load_denoiser(path).eval(), fam.load_vae(path, torch.device("cpu")))
    pipe.set_progress_bar_config(disable=True)
    base, _ = resample(cfg, report, pipe)
    assert np.abs(base - sampled).max() > 3

    # `export --format diffusers` is the stored file; kohya is the LyCORIS layout (SD) or refused.
    store = Store(cfg.store)
    exported, name = export(store, report, "diffusers")
    assert exported == data and f"-{adapter}-" in name
    if family == "sd":
        kohya, _ = export(store, report, "kohya")
        assert all(k.startswith("lora_unet_") for k in load_safetensors(kohya))
    else:
        with pytest.raises(ValueError, match=f"no kohya layout for flux {adapter} weights; use --format diffusers"):
            export(store, report, "kohya")


@pytest.mark.parametrize("family,adapter", [("sd", "lokr"), ("flux", "loha")])
def test_lycoris_adapter_with_dropout_resumes_bitwise(tmp_path, family, adapter):
    """6 steps, then 9 on the same store (resuming at 6), against 9 from nothing: the same weights,
    bit for bit, with rank and module dropout drawing from torch's global generator all along."""
    generate_shapes(tmp_path / "data", variants=1)
    train = {"adapter": adapter, "rank_dropout": 0.3, "module_dropout": 0.3, "learning_rate": LEARNING_RATES[family]}
    short = small_config(tmp_path / "store", tmp_path / "data", family, train=train, sample={"prompts": []})
    run(short)
    longer = short.model_copy(update={"train": short.train.model_copy(update={"steps": 9})})
    resumed, _ = run(longer)
    assert (row(resumed, "train").reused, row(resumed, "train").computed) == (6, 3)
    fresh, _ = run(longer.model_copy(update={"store": str(tmp_path / "store-2")}))
    assert row(fresh, "train").reused == 0
    a, b = load_safetensors(Path(resumed.weights).read_bytes()), load_safetensors(Path(fresh.weights).read_bytes())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("train,field", [
    ({"adapter": "lokr", "use_dora": True}, "train.use_dora"),
    ({"adapter": "loha", "decompose_both": True}, "train.decompose_both"),
    ({"rank_dropout": 0.1}, "train.rank_dropout"),
    ({"adapter": "lokr", "decompose_factor": 0}, "train.decompose_factor"),
])
def test_an_option_the_adapter_lacks_names_the_field(train, field):
    with pytest.raises(ValidationError, match=field):
        TrainConfig(**train)


# --- kohya export: LyCORIS' keys give peft's weight updates --------------------------------------

def lycoris_update(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """A module's weight update from its LyCORIS keys, as ComfyUI computes it (its `loha` and `lokr`
    weight adapters): the scale is alpha / the rank of a low-rank factor, 1 when there is none."""
    t = tensors
    tucker = "i j k l, j r, i p -> p r k l"
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            m1 = torch.einsum(tucker, t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            m2 = torch.einsum(tucker, t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            m1, m2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return (m1 * m2).reshape(shape) * (t["alpha"] / t["hada_w1_b"].shape[0])
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        w2 = (torch.einsum(tucker, t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]) if "lokr_t2" in t
              else t["lokr_w2_a"] @ t["lokr_w2_b"])
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = t["alpha"] / dim if "alpha" in t and dim is not None else 1.0
    return torch.kron(w1, w2.contiguous()).reshape(shape) * scale


KOHYA_VARIANTS = {
    "loha": {"adapter": "loha", "lora_targets": "conv"},
    "loha_tucker": {"adapter": "loha", "lora_targets": "conv", "use_effective_conv2d": True},
    "lokr": {"adapter": "lokr", "lora_targets": "conv"},
    "lokr_decomposed": {"adapter": "lokr", "lora_targets": "conv", "rank": 1, "decompose_both": True,
                        "use_effective_conv2d": True, "rank_pattern": {"to_q": 2}, "alpha_pattern": {"to_k": 8.0}},
}


@pytest.mark.parametrize("variant", KOHYA_VARIANTS)
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_export_of_lycoris_weights_gives_peft_updates(family, variant):
    hp = TrainConfig(alpha=3.0, **KOHYA_VARIANTS[variant])
    denoiser = trained(family, hp)
    kohya = load_safetensors(lycoris_to_kohya(export_weights(get_family(family), denoiser, "lora"), "unet"))
    layers = {name: m for name, m in denoiser.named_modules() if hasattr(m, "get_delta_weight")}
    assert {k.rsplit(".", 1)[0] for k in kohya} == {"lora_unet_" + name.replace(".", "_") for name in layers}
    for name, layer in layers.items():
        prefix = "lora_unet_" + name.replace(".", "_") + "."
        mine = {k.removeprefix(prefix): v for k, v in kohya.items() if k.startswith(prefix)}
        expected = layer.get_delta_weight("default")
        torch.testing.assert_close(lycoris_update(mine, expected.shape), expected, rtol=1e-5, atol=1e-6, msg=name)
    if variant == "lokr":  # some modules have no low-rank factor, so no alpha: their scale is in lokr_w1
        whole = {k.rsplit(".", 1)[0] for k in kohya if k.endswith(".lokr_w2")}
        assert whole - {k.rsplit(".", 1)[0] for k in kohya if k.endswith(".alpha")}
    if variant in ("loha_tucker", "lokr_decomposed"):
        assert any(k.endswith(("hada_t1", "lokr_t2")) for k in kohya)
    if variant == "lokr_decomposed":
        assert any(k.endswith("lokr_w1_b") for k in kohya)


def test_an_adapter_on_full_fine_tuning_names_the_field():
    with pytest.raises(ValueError, match="adapter apply to method: lora"):
        get_family("sd").check_train(TrainConfig(method="full", adapter="lokr"))
