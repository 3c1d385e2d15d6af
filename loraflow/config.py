"""The run configuration: one pydantic model, the flow's only parameter, loadable from YAML.

Defined here (an importable module) so Prefect hashes and validates it the same way whether the
flow runs from the CLI, a test or a deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator


class _Section(BaseModel):
    # Errors name the field, never echo the input: it may hold storage credentials.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class ModelConfig(_Section):
    family: Literal["sd", "sdxl", "sd3", "flux", "sana"] = "sd"
    # "builtin:tiny-<family>", a local diffusers folder, or a hub id.
    source: str = "builtin:tiny-sd"
    revision: str | None = None


class DatasetConfig(_Section):
    # A folder of images with same-stem .txt captions, or an imagefolder with metadata.jsonl;
    # a local path or an fsspec URL. "builtin:shapes" generates the demo dataset.
    source: str = "builtin:shapes"
    resolution: int = Field(32, ge=8)
    center_crop: bool = True
    flip: bool = False  # also cache the mirrored latent; training picks one at random
    # Aspect-ratio buckets (`loraflow.buckets`): each image is cut to the bucket of about
    # resolution² pixels, sides multiples of `bucket_step`, whose aspect ratio is nearest its own;
    # batches never mix buckets. None: the family's default (on for SDXL, SD3 and Flux).
    buckets: bool | None = None
    bucket_step: int = Field(64, ge=8)
    bucket_min_side: int | None = Field(None, ge=8)  # None: resolution / 2
    bucket_max_side: int | None = Field(None, ge=8)  # None: resolution * 2
    # Images per VAE forward pass (None: 8 on a CPU, 16 on a GPU). In no cache key: changing it
    # re-encodes nothing (see `loraflow.batching`).
    encode_batch_size: int | None = Field(None, ge=1)
    # Images (and distinct captions) per shard, at most, on average: the latent cache and caption
    # encoding run as one task per content-defined shard (`loraflow.shards`), each with its own
    # cache record, so adding an image re-runs one shard. How the work is cut: in no object's key.
    # Each shard costs a task run, a record and a start of its helpers (tens of ms on a CPU,
    # bench/scale.py): 4,096 keeps that under a few % of its encoding, with 256 shards at 1M images.
    shard_size: int = Field(4096, ge=1)
    # Helper processes that read, check and cut images and write latents while the VAE encodes (None:
    # one per core beside the encoder's, up to 4; 0: a thread of the encoder's process). In no cache key.
    helpers: int | None = Field(None, ge=0)


class EncoderConfig(_Section):
    max_length: int | None = Field(None, ge=1)  # None: the family's default
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    instruction: str | None = None  # a prefix put before every prompt (e.g. Sana's CHI)
    t5_attention_mask: bool = False  # Flux: T5 attends to the prompt's tokens only, not its padding
    # Prompts per text-encoder forward pass (None: 8 on a CPU, 64 on a GPU). How the work is cut,
    # not what an embedding is: left out of every key (`cache_token`).
    batch_size: int | None = Field(None, ge=1)

    def cache_token(self) -> dict[str, Any]:
        return self.model_dump(exclude={"batch_size"})


class TrainConfig(_Section):
    method: Literal["lora", "full"] = "lora"
    rank: int = Field(4, ge=1)
    alpha: float = 4.0
    learning_rate: float = Field(1e-3, gt=0)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    caption_dropout: float = Field(0.0, ge=0, le=1)
    # accelerate's autocast of the forward pass; fp16 (a GPU only) also scales the loss (a GradScaler,
    # its state in every checkpoint).
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # The frozen base under a LoRA, loaded in this dtype (half its memory in bfloat16 or float16);
    # the LoRA itself trains in float32. bfloat16 needs mixed_precision: bf16, float16 fp16.
    base_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The frozen base's linear layers quantized as they load (torchao through diffusers' TorchAoConfig:
    # Int8WeightOnlyConfig or Float8WeightOnlyConfig), a quarter of their float32 memory; the other
    # layers in base_dtype. method: lora only; needs pip install 'loraflow[quant]'.
    base_quantization: Literal["int8_weight_only", "float8_weight_only"] | None = None
    # Data-parallel processes (accelerate launch; gloo between CPU processes): each trains on
    # `batch_size` examples of every step's batch of batch_size x processes. In the key: N x B and
    # 1 x N*B learn the same to float rounding, not bitwise.
    processes: int = Field(1, ge=1)
    seed: int = 0
    # Flow-matching families (SD3, Flux): how training timesteps are drawn and losses weighted, as
    # diffusers' SD3/Flux trainers do. None: the family's default (SD3 logit_normal, Flux none).
    weighting_scheme: Literal["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"] | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_embedding: float = 3.5  # fed to denoisers that embed a guidance value (FLUX.1-dev)
    # SD3: the denoiser's output preconditioned to predict the clean latent, as diffusers' SD3
    # trainer does by default (None: the family's default; only SD3 has the option).
    precondition_outputs: bool | None = None
    # Epsilon/v-prediction families (SD, SDXL): min-SNR loss weighting (5.0 is the paper's value)
    # and an offset added to the noise per latent channel (about 0.05 helps very dark or bright images).
    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)

    # Optimization. `steps` counts optimizer steps, each over `gradient_accumulation_steps` batches.
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"  # adamw8bit: bitsandbytes, CUDA only
    weight_decay: float = Field(1e-2, ge=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "constant_with_warmup"  # diffusers' get_scheduler
    lr_warmup_steps: int = Field(10, ge=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    ema_decay: float | None = Field(None, gt=0, lt=1)  # an EMA of the trained weights, stored beside them

    # LoRA: which layers (a preset: attention, + MLP, every linear layer, + the UNet's resnet convs),
    # per-layer rank/alpha overrides (peft's rank_pattern/alpha_pattern: layer name pattern -> value)
    # and DoRA (peft's use_dora).
    lora_targets: Literal["attention", "attention_mlp", "all_linear", "conv"] = "attention"
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    use_dora: bool = False
    # The adapter of method: lora, through peft: LoRA, or LyCORIS' LoHa (Hadamard product of two
    # low-rank pairs) or LoKr (Kronecker product). rank, alpha, lora_targets and the patterns apply
    # to all three; the options below to LoHa and LoKr only (peft's LoHaConfig / LoKrConfig fields).
    adapter: Literal["lora", "loha", "lokr"] = "lora"
    rank_dropout: float = Field(0.0, ge=0, lt=1)  # drop rows of the weight update while training
    module_dropout: float = Field(0.0, ge=0, lt=1)  # drop a layer's whole update while training
    use_effective_conv2d: bool = False  # conv layers (lora_targets: conv): a Tucker core per kernel
    decompose_both: bool = False  # LoKr: the Kronecker product's left factor low-rank too
    decompose_factor: int = -1  # LoKr: how layer sizes are factored (-1: as near square as can be)

    # How training runs, not what it learns: in no key.
    # Recompute activations in the backward pass (less memory, about a third slower).
    gradient_checkpointing: bool = False
    # Memory for latents and caption embeddings read during training (least recently used ones are
    # dropped and read again when needed).
    data_cache_mb: int = Field(2048, ge=1)
    log_every: int = Field(10, ge=1)  # a progress line every this many steps
    # TensorBoard event files; None: $LORAFLOW_HOME/tensorboard/<run>. "" turns them off.
    tensorboard_dir: str | None = None
    # Weights & Biases project the same per-step scalars also go to (needs wandb: the `wandb` extra);
    # one W&B run per training run, resumed with it. Mode, key and folder: WANDB_MODE, WANDB_API_KEY,
    # WANDB_DIR... from the environment.
    wandb_project: str | None = None

    def cache_token(self) -> dict[str, Any]:
        return self.model_dump(exclude=RUNTIME_ONLY)

    @model_validator(mode="after")
    def _adapter_options_fit(self) -> "TrainConfig":
        if self.adapter != "lora" and self.use_dora:
            raise ValueError(f"train.use_dora: DoRA is a LoRA variant; train.adapter: {self.adapter} has none")
        defaults = TrainConfig.model_fields
        only = {"rank_dropout": {"loha", "lokr"}, "module_dropout": {"loha", "lokr"},
                "use_effective_conv2d": {"loha", "lokr"}, "decompose_both": {"lokr"}, "decompose_factor": {"lokr"}}
        for name, adapters in only.items():
            if self.adapter not in adapters and getattr(self, name) != defaults[name].default:
                raise ValueError(f"train.{name} applies to train.adapter: {' or '.join(sorted(adapters))}, "
                                 f"not {self.adapter}")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError("train.decompose_factor: -1 (as near square as can be) or a factor of at least 1")
        return self

    @model_validator(mode="after")
    def _base_fits(self) -> "TrainConfig":
        if self.base_dtype != "float32" and self.method != "lora":
            raise ValueError(f"train.base_dtype: {self.base_dtype} is for a frozen base under a LoRA; "
                             f"method: {self.method} trains the base itself (use float32)")
        if self.base_quantization and self.method != "lora":
            raise ValueError(f"train.base_quantization: {self.base_quantization} is for a frozen base under a "
                             f"LoRA; method: {self.method} trains the base itself (leave it null)")
        autocast = {"bfloat16": "bf16", "float16": "fp16"}.get(self.base_dtype)
        if autocast and self.mixed_precision != autocast:
            raise ValueError(f"train.base_dtype: {self.base_dtype} needs train.mixed_precision: {autocast} "
                             f"(the forward pass runs under {autocast} autocast)")
        return self


RUNTIME_ONLY = {"gradient_checkpointing", "data_cache_mb", "log_every", "tensorboard_dir", "wandb_project"}


class SamplerSettings(_Section):
    steps: int = Field(10, ge=1)
    guidance_scale: float = 4.0  # classifier-free guidance through the null embedding (Flux: true CFG)
    guidance_embedding: float = 3.5  # fed to denoisers that embed a guidance value (FLUX.1-dev)
    seed: int = 0
    images_per_prompt: int = Field(1, ge=1)
    checkpoints: list[int] = Field(default_factory=list)  # intermediate steps to sample as well


class SampleConfig(SamplerSettings):
    prompts: list[str] | None = None  # inline prompts; or read once from `prompts_file`
    prompts_file: str | None = None

    def sampler(self) -> SamplerSettings:
        return SamplerSettings(**self.model_dump(exclude={"prompts", "prompts_file"}))


class RunnerConfig(_Section):
    """Where the sharded stages (latent cache, caption encoding) run, through a Prefect task runner:
    `threads` in the flow's process, or `dask` (prefect-dask's `DaskTaskRunner`): the Dask cluster
    whose scheduler is at `address`, or without one a local cluster of `workers` processes."""

    kind: Literal["threads", "dask"] = "threads"
    workers: int = Field(2, ge=1)  # threads, or local Dask worker processes (one thread each)
    address: str | None = None  # e.g. tcp://scheduler:8786 (kind: dask)
    # Tag task runs `loraflow` and `stage:<task>`, for Prefect tag concurrency limits. Off by default:
    # every tagged task run costs an API call (Prefect acquires its tags' slots, limit or not).
    tags: bool = False


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=lambda: SampleConfig(prompts=DEMO_PROMPTS))
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    store: str = "./loraflow-store"  # any fsspec URL: a folder, s3://bucket/prefix, memory://...
    # fsspec options for every remote URL in this config (store, dataset, model, prompts file), e.g.
    # {"endpoint_url": ...}. Credentials are better left to the environment (AWS_ACCESS_KEY_ID, ...)
    # or to `storage_secret`; any given here are masked wherever the config is shown.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # Name of a Prefect Secret block whose JSON object is merged into storage_options at run time.
    storage_secret: str | None = None

    @field_serializer("storage_options", when_used="json")
    def _masked(self, options: dict[str, Any]) -> dict[str, str]:
        # JSON is how Prefect records flow-run parameters (and how the UI shows them): values never
        # leave the process, only the option names do.
        return {name: "**********" for name in options}

    @model_validator(mode="after")
    def _checkpoints_exist(self) -> "RunConfig":
        for step in self.sample.checkpoints:
            if step % self.train.checkpoint_every or not 0 < step <= self.train.steps:
                raise ValueError(
                    f"sample.checkpoints: step {step} is not a checkpoint (train.checkpoint_every is "
                    f"{self.train.checkpoint_every}, train.steps {self.train.steps})")
        return self

    @classmethod
    def demo(cls) -> "RunConfig":
        """The no-config demo: long enough on the tiny model for samples to take their prompt's colour."""
        return cls.model_validate({
            "encoder": {"max_length": 16},
            "train": {"method": "full", "steps": 600, "checkpoint_every": 200, "batch_size": 8},
            "sample": {"prompts": DEMO_PROMPTS, "steps": 20, "guidance_scale": 5.0, "checkpoints": [200]},
        })

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        text = Path(path).read_text()
        return cls.model_validate(yaml.safe_load(text) or {})

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = ()) -> "RunConfig":
        """A YAML file's config (the demo's without one) with `FIELD=VALUE` overrides (`train.steps=50`;
        the value is read as YAML)."""
        data = (yaml.safe_load(Path(path).read_text()) or {}) if path else cls.demo().model_dump(exclude_unset=True)
        for override in overrides:
            name, sep, value = override.partition("=")
            if not sep or not name:
                raise ValueError(f"--set {override!r}: expected FIELD=VALUE, e.g. train.steps=50")
            *parents, leaf = name.strip().split(".")
            section = data
            for part in parents:
                section = section.setdefault(part, {})
                if not isinstance(section, dict):
                    raise ValueError(f"--set {name}: {part} is not a section")
            section[leaf] = yaml.safe_load(value)
        return cls.model_validate(data)

    @classmethod
    def fields(cls, prefix: str = "") -> list[tuple[str, str, Any]]:
        """(dotted name, type, default) of every field, sections expanded."""
        return _fields(cls, prefix)


DEMO_PROMPTS = ["a red circle", "a green square", "a blue triangle"]


def _fields(model: type[BaseModel], prefix: str) -> list[tuple[str, str, Any]]:
    found = []
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            found += _fields(type(default), f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", _type_name(info.annotation), default))
    return found


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
