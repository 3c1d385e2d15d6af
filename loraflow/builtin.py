"""Built-in tiny models, built offline from configs with the real diffusers/transformers classes.

They are saved as ordinary diffusers folders and then loaded through the same code path as a real
checkpoint (`loraflow.models`). Construction is seeded, so every machine with the same library
versions builds byte-identical weights. Tokenizers are built from in-memory vocabularies
(character-level CLIP, Unigram T5, byte-fallback Gemma), so nothing is ever fetched from a hub.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import string
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loraflow.progress import Progress

log = logging.getLogger("loraflow.builtin")

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("tiny-sd", "tiny-sana", "tiny-sdxl", "tiny-sd3", "tiny-flux")
_PRINTABLE = [c for c in string.printable if not c.isspace()]


def cache_root() -> Path:
    return Path(os.environ.get("LORAFLOW_HOME", Path.home() / ".cache" / "loraflow"))


def builtin_path(name: str) -> Path:
    """Local folder of a built-in model, built on first use."""
    if name not in BUILTINS:
        raise ValueError(f"model.source: unknown built-in model {name!r}; known: {', '.join(BUILTINS)}")
    torch_version = torch.__version__.split("+")[0]
    build = {"tiny-sd": build_tiny_sd, "tiny-sana": build_tiny_sana, "tiny-sdxl": build_tiny_sdxl,
             "tiny-sd3": build_tiny_sd3, "tiny-flux": build_tiny_flux}[name]
    return build_once(cache_root() / "builtin" / f"{name}-v4-torch{torch_version}",
                      lambda folder: build().save_pretrained(folder))


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """`folder`, made by `build` on first use, by one process at a time and moved into place whole.

    Runs started together wait for the first one's build and then use its folder; none of them can
    see a half-built one. A build killed midway leaves only `.<name>.partial`, redone next time.
    """
    if folder.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building %s", folder)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when the process dies
        if not folder.exists():
            log.info("building %s (once per machine)", folder)
            start = time.monotonic()
            partial = folder.with_name(f".{folder.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            build(partial)
            partial.rename(folder)
            log.info("built %s in %.1f s", folder.name, time.monotonic() - start)
    return folder


def clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tok.model_max_length = 77
    return tok


def t5_tokenizer():
    """Unigram T5 tokenizer: one piece per printable character, with and without the word marker."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in _PRINTABLE] + [(c, -4.0) for c in _PRINTABLE]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def clip_text_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "projection_dim": 32, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
        "bos_token_id": 0, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    })


def t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8,
        vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def gemma_tokenizer():
    from transformers import GemmaTokenizer

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁"] + _PRINTABLE
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    tok = GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], add_bos_token=True)
    tok.padding_side = "right"
    tok.model_max_length = 300
    return tok


def build_tiny_sd():
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tokenizer), max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = small_kl_vae()
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", num_train_timesteps=1000, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def small_kl_vae(shift: bool = False):
    """A tiny KL VAE (4 latent channels, 2x downsampling), fitted; SD3/Flux-style with `shift`."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8, sample_size=32,
        use_quant_conv=not shift, use_post_quant_conv=not shift,  # SD3 and Flux VAEs have neither
    )
    fit_autoencoder(vae, shift=shift)
    return vae.eval()


def fit_autoencoder(vae, steps: int = 400, size: int = 16, shift: bool = False) -> None:
    """Teach a random tiny VAE to round-trip colours (seconds on CPU).

    A randomly initialised decoder maps every latent to grey, so nothing a model learned would be
    visible in its samples. A few hundred steps on random two-colour rectangles fix that; the VAE
    is convolutional, so what it learns on 16x16 crops holds at any resolution.
    """
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)

    def rectangles(n: int = 16) -> torch.Tensor:
        colours = torch.rand(2, n, 3, 1, 1, generator=generator) * 2 - 1
        x = colours[0].expand(n, 3, size, size).clone()
        for i in range(n):
            top, bottom = sorted(torch.randint(0, size, (2,), generator=generator).tolist())
            left, right = sorted(torch.randint(0, size, (2,), generator=generator).tolist())
            x[i, :, top : bottom + 1, left : right + 1] = colours[1, i]
        return x

    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    progress = Progress(log, "fitting the tiny VAE", steps, " steps")
    for _ in range(steps):
        progress.advance()
        x = rectangles()
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.mode()).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # as for real VAEs: a scaling factor that gives latents unit variance
        latents = vae.encode(rectangles(64)).latent_dist.mode()
    if shift:  # SD3 / Flux: (z - shift_factor) * scaling_factor
        vae.register_to_config(shift_factor=round(latents.mean().item(), 5))
        latents = latents - latents.mean()
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))


def build_tiny_sana():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=16, hidden_size=16, intermediate_size=64, num_attention_heads=2,
            num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer),
            pad_token_id=0, bos_token_id=2, eos_token_id=1, attn_implementation="eager",
        )
    )
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
        cross_attention_dim=16, caption_channels=16, sample_size=16,
    )
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1],
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
        transformer=transformer.eval(), scheduler=scheduler,
    )


def build_tiny_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # both CLIPs' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + the pooled embedding
    )
    vae = small_kl_vae()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler, add_watermarker=False,
    )


def build_tiny_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=64,  # T5's width; the two CLIPs (32 + 32) are zero-padded to it
        pooled_projection_dim=64,  # both CLIPs' pooled projections, concatenated
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=small_kl_vae(shift=True),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(tokenizer)).eval(), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tokenizer_2)).eval(), tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(tokenizer_3, d_model=64).eval(), tokenizer_3=tokenizer_3,
    )


def build_tiny_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16,  # 4 latent channels, packed 2x2
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,  # as FLUX.1-dev
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's: the shift depends on the image size
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=small_kl_vae(shift=True),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer)).eval(), tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_2, d_model=32).eval(), tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )
