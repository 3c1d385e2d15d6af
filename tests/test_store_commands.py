"""The store commands on real runs: `loraflow ls`, `show`, `gc` (alone and beside a live run) and
`export` (loaded back with diffusers' `load_lora_weights`, giving the run's own sample)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loraflow import cli
from loraflow.families import get_family
from loraflow.live import GC_MARKER
from loraflow.models import resolve_model
from loraflow.store import Store
from tests.helpers import finish, resample, run, session_env, small_config, snapshot, start_cli, task_states


def command(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def files(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}


def test_ls_and_show_list_runs_with_samples_by_prompt_and_step(shapes, tmp_path, capsys):
    cfg = small_config(tmp_path / "store", shapes, sample={"checkpoints": [3]})
    first, _ = run(cfg)
    second, _ = run(cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"seed": 5})}))
    code, out = command(capsys, "ls", "--store", cfg.store)
    assert code == 0
    lines = [line for line in out.splitlines() if line[:8] in (first.flow_run_id[:8], second.flow_run_id[:8])]
    assert [line[:8] for line in lines] == [first.flow_run_id[:8], second.flow_run_id[:8]]  # oldest first

    code, out = command(capsys, "show", second.flow_run_id[:8], "--store", cfg.store)
    assert code == 0 and second.flow_run_id in out
    for prompt in cfg.sample.prompts:  # each sample: its prompt, the step it was made at, where it is
        for step in (3, 6):
            assert any(f"step {step:5d}" in line and repr(prompt) in line and ".png" in line for line in out.splitlines())
    assert "sample" in out and "Completed" in out  # the stage table
    assert command(capsys, "show", "nosuchrun", "--store", cfg.store)[0] == 1


def test_gc_keeps_what_kept_runs_need_and_frees_the_rest(shapes, tmp_path, capsys):
    cfg = small_config(tmp_path / "store", shapes)
    store = Path(cfg.store)
    old, _ = run(cfg)
    (shapes / "red_circle_0.txt").write_text("a crimson circle\n")  # new captions: a new training run
    new, _ = run(cfg)
    leftover = store / "objects" / "latents" / "zz" / "half-written.safetensors.tmp-0123456789ab"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"x" * 1000)

    before = snapshot(store)
    code, out = command(capsys, "gc", "--keep", "1", "--dry-run", "--store", cfg.store)
    assert code == 0 and "would free" in out
    assert snapshot(store) == before  # a dry run deletes nothing

    checkpoints = len(list((store / "objects" / "checkpoints").rglob("*.safetensors")))
    code, out = command(capsys, "gc", "--keep", "1", "--store", cfg.store)
    assert code == 0 and "freed" in out
    assert not leftover.exists()
    assert not (store / "reports" / f"{old.flow_run_id}.json").exists()
    assert (store / "reports" / f"{new.flow_run_id}.json").exists()
    # Two runs of 2 checkpoints each: only the kept run's final one stays.
    assert checkpoints == 4 and len(list((store / "objects" / "checkpoints").rglob("*.safetensors"))) == 1
    freed = float(out.split("freed ")[1].split(" MiB")[0])
    assert freed > 0

    # The kept run is whole: running it again finds every stage Cached, and training longer
    # resumes from its final checkpoint.
    _, states = run(cfg)
    assert set(states.values()) == {"Cached"}
    longer, states = run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 9})}))
    assert states["train"] == "Completed"
    assert next(r for r in longer.tasks if r.task == "train").reused == 6  # resumed at step 6
    # The dropped run's config trains again (its training was collected), reusing every latent.
    (shapes / "red_circle_0.txt").write_text("a red circle\n")
    report, states = run(cfg)
    assert states["train"] == "Completed" and states["latents"] == "Cached"
    assert command(capsys, "gc", "--store", cfg.store)[0] == 0  # nothing to keep out: still fine


@pytest.mark.slow
def test_gc_during_a_live_run_deletes_nothing_and_the_run_loses_nothing(shapes, tmp_path, capsys):
    cfg = small_config(tmp_path / "store", shapes, train={"steps": 200, "checkpoint_every": 20})
    store = Path(cfg.store)
    run(small_config(tmp_path / "store", shapes))  # an earlier run: garbage for gc once it is gone
    proc = start_cli(cfg, tmp_path, "live", session_env(OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 600
    while not list((store / "objects" / "checkpoints").rglob("*.sha256"))[2:]:  # training, past 1 checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached training"
        time.sleep(0.2)
    present = files(store)
    code, out = command(capsys, "gc", "--keep", "0", "--store", cfg.store)
    assert code == 1 and "in progress" in out
    assert present <= files(store)  # nothing deleted
    finish(proc)
    report = json.loads((tmp_path / "live.json").read_text())
    live_states = task_states(report["flow_run_id"])
    assert live_states["train"] == "Completed" and set(live_states.values()) <= {"Completed", "Cached"}
    _, states = run(cfg)  # everything the live run made is there
    assert set(states.values()) == {"Cached"}
    assert command(capsys, "gc", "--keep", "1", "--store", cfg.store)[0] == 0  # once it is over, gc works


def test_a_run_waits_for_a_gc_in_progress(shapes, tmp_path):
    cfg = small_config(tmp_path / "store", shapes)
    store = Store(cfg.store)
    store.write_atomic(GC_MARKER, json.dumps({"gc": True, "heartbeat": time.time()}).encode())
    released = []

    def release() -> None:
        time.sleep(3)
        released.append(time.time())
        store.delete(GC_MARKER)

    threading.Thread(target=release).start()
    run(cfg)
    written = [p.stat().st_mtime for p in (Path(cfg.store) / "objects").rglob("*") if p.is_file()]
    assert released and min(written) >= released[0]  # no object written before the gc ended


@pytest.mark.parametrize("family,fmt,lr,targets", [
    ("sd", "kohya", 1e-2, "attention"), ("sdxl", "kohya", 1e-2, "attention"),
    ("flux", "diffusers", 1e-1, "attention"), ("flux", "kohya", 1e-1, "all_linear")])
def test_exported_lora_loads_back_and_gives_the_runs_sample(shapes, tmp_path, capsys, family, fmt, lr, targets):
    # alpha != rank: the export must carry the trained scale, not diffusers' default alpha = rank.
    # (The tiny Flux needs a larger step before its LoRA moves the 8-bit image at all.)
    cfg = small_config(tmp_path / "store", shapes, family,
                       train={"rank": 4, "alpha": 2.0, "learning_rate": lr, "lora_targets": targets})
    report, _ = run(cfg)
    out = tmp_path / "exported" / "lora.safetensors"
    code, said = command(capsys, "export", report.flow_run_id[:8], "--format", fmt, "--out", str(out), "--store", cfg.store)
    assert code == 0 and out.exists(), said
    from safetensors.torch import load_file

    exported = load_file(out)
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") for k in exported)
        assert any(k.endswith(".lora_down.weight") for k in exported) and any(k.endswith(".alpha") for k in exported)
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in exported.items() if k.endswith(".alpha")}
    if family in ("sd", "sdxl") and fmt == "kohya":
        assert set(alphas.values()) == {2.0}
    if family == "flux" and fmt == "kohya":  # sd-scripts' names; fused or not, every module at the trained 2/4
        assert set(alphas) == {f"lora_unet_{name}" for name in TINY_FLUX_KOHYA}
        assert {alpha / exported[f"{m}.lora_down.weight"].shape[0] for m, alpha in alphas.items()} == {0.5}

    # Sample as the run did, without the LoRA and with it loaded into the family's pipeline as a user would.
    fam = get_family(family)
    model = resolve_model(cfg.model, {})
    pipe = fam.pipeline(model.denoiser.path, fam.load_denoiser(model.denoiser.path).eval(),
                        fam.load_vae(model.vae.path, torch.device("cpu")))
    pipe.set_progress_bar_config(disable=True)
    base, sampled = resample(cfg, report, pipe)
    if (family, fmt) == ("flux", "kohya"):
        # diffusers' kohya Flux reader assumes FLUX.1's widths (3072) for linear1, so on the tiny model
        # the file is applied as ComfyUI applies it; test_flux_kohya_reads_back_in_diffusers reads it
        # with diffusers' own converter at FLUX.1's widths.
        merge_kohya_flux(pipe.transformer, exported)
    else:
        pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    diff = np.abs(resample(cfg, report, pipe)[0] - sampled)
    assert diff.max() <= 2, diff.max()  # the same image, to 8-bit rounding of float differences
    assert np.abs(base - sampled).max() > 2  # without the LoRA it is another image: the comparison can fail


# sd-scripts' Flux LoRA modules of the tiny model (one double-stream block, one single-stream block)
# and the diffusers weights stacked in each of Black Forest Labs' (fused) weights.
TINY_FLUX_KOHYA = {
    "double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "double_blocks_0_img_attn_proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks_0_img_mlp_0": ["transformer_blocks.0.ff.net.0.proj"],
    "double_blocks_0_img_mlp_2": ["transformer_blocks.0.ff.net.2"],
    "double_blocks_0_img_mod_lin": ["transformer_blocks.0.norm1.linear"],
    "double_blocks_0_txt_attn_qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"],
    "double_blocks_0_txt_attn_proj": ["transformer_blocks.0.attn.to_add_out"],
    "double_blocks_0_txt_mlp_0": ["transformer_blocks.0.ff_context.net.0.proj"],
    "double_blocks_0_txt_mlp_2": ["transformer_blocks.0.ff_context.net.2"],
    "double_blocks_0_txt_mod_lin": ["transformer_blocks.0.norm1_context.linear"],
    "single_blocks_0_linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
    "single_blocks_0_linear2": ["single_transformer_blocks.0.proj_out"],
    "single_blocks_0_modulation_lin": ["single_transformer_blocks.0.norm.linear"],
    "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
    "time_in_in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in_out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in_in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in_out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in_in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in_out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer_linear": ["proj_out"],
    "final_layer_adaLN_modulation_1": ["norm_out.linear"],
}


def merge_kohya_flux(transformer: torch.nn.Module, lora: dict[str, torch.Tensor]) -> None:
    """A kohya Flux LoRA applied as ComfyUI does: BFL's weight += up @ down * alpha / rank, every module."""
    for name, modules in TINY_FLUX_KOHYA.items():
        down, up = lora[f"lora_unet_{name}.lora_down.weight"], lora[f"lora_unet_{name}.lora_up.weight"]
        delta = up @ down * lora[f"lora_unet_{name}.alpha"] / down.shape[0]
        if name == "final_layer_adaLN_modulation_1":  # BFL's (shift, scale) -> diffusers' (scale, shift)
            delta = torch.cat(delta.chunk(2)[::-1])
        weights = [transformer.get_submodule(m).weight for m in modules]
        with torch.no_grad():
            for weight, part in zip(weights, delta.split([w.shape[0] for w in weights]), strict=True):
                weight += part


def test_flux_kohya_reads_back_in_diffusers(tmp_path):
    """At FLUX.1's widths, diffusers' kohya reader splits the fused modules back into the LoRA trained:
    each module's up @ down * scale is what it was (zeros for proj_mlp, which had no LoRA in block 0)."""
    from diffusers import FluxPipeline

    from loraflow.export import ExportError, flux_to_kohya

    width, rank = 3072, 4
    shapes = {"transformer_blocks.0.attn.to_q": (width, width), "transformer_blocks.0.attn.to_k": (width, width),
              "transformer_blocks.0.attn.to_v": (width, width), "transformer_blocks.0.ff.net.2": (width, 4 * width),
              "single_transformer_blocks.0.attn.to_q": (width, width),
              "single_transformer_blocks.0.attn.to_k": (width, width),
              "single_transformer_blocks.0.attn.to_v": (width, width),
              "single_transformer_blocks.1.attn.to_q": (width, width),
              "single_transformer_blocks.1.attn.to_k": (width, width),
              "single_transformer_blocks.1.attn.to_v": (width, width),
              "single_transformer_blocks.1.proj_mlp": (4 * width, width),
              "single_transformer_blocks.1.proj_out": (width, 5 * width)}
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for module, (rows, cols) in shapes.items():
        lora[f"{module}.lora_A.weight"] = torch.randn(rank, cols, generator=generator)
        lora[f"{module}.lora_B.weight"] = torch.randn(rows, rank, generator=generator)

    def diffusers_file(alpha_pattern: dict) -> bytes:
        config = {"r": rank, "lora_alpha": 2.0, "alpha_pattern": alpha_pattern, "target_modules": sorted(shapes)}
        FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=lora, transformer_lora_adapter_metadata=config)
        return (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()

    kohya = tmp_path / "kohya.safetensors"
    kohya.write_bytes(flux_to_kohya(diffusers_file({})))
    from safetensors.torch import load_file

    written = load_file(kohya)
    assert written["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (4 * rank, width)
    assert written["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * width, 4 * rank)
    assert float(written["lora_unet_single_blocks_0_linear1.alpha"]) == 2.0 * 4  # scale 2/4 over rank 16
    assert float(written["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 2.0 * 3
    assert float(written["lora_unet_double_blocks_0_img_mlp_2.alpha"]) == 2.0

    state = FluxPipeline.lora_state_dict(str(kohya))
    state = state[0] if isinstance(state, tuple) else state
    for module in [*shapes, "single_transformer_blocks.0.proj_mlp"]:
        a, b = state[f"transformer.{module}.lora_A.weight"], state[f"transformer.{module}.lora_B.weight"]
        if module == "single_transformer_blocks.0.proj_mlp":
            assert a.shape[0] == rank and not (b @ a).any()
            continue
        assert a.shape[0] == rank, module  # split back, not one rank-16 LoRA per part
        expected = lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"] * 2.0 / rank
        torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-4)

    # A fused module's parts must share one scale: one clear error naming them.
    with pytest.raises(ExportError, match="single_blocks_1_linear1.*proj_mlp.*alpha / rank"):
        flux_to_kohya(diffusers_file({"single_transformer_blocks.1.proj_mlp": 8.0}))
