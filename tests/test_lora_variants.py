"""LoRA variants (target presets, per-layer rank, DoRA): what training exports is what a diffusers
pipeline loads with `load_lora_weights`, every layer of it."""

from __future__ import annotations

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from loraflow.builtin import builtin_path
from loraflow.config import TrainConfig
from loraflow.families import get_family
from loraflow.weights import apply_weights
from tests.helpers import FAMILIES

VARIANTS = {
    "attention_mlp": {"lora_targets": "attention_mlp"},
    "all_linear": {"lora_targets": "all_linear"},
    "conv": {"lora_targets": "conv"},
    "dora": {"lora_targets": "attention_mlp", "use_dora": True},
    "rank_pattern": {"rank": 4, "rank_pattern": {"to_q": 2}, "alpha_pattern": {"to_q": 8.0}},
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
    apply_weights(pipe, fam, "lora", fam.export_lora(denoiser))
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
