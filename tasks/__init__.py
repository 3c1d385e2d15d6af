"""loraflow's five cached Prefect tasks, one module each; `caching` holds their cache policy."""

from tasks.encode_prompts import encode_prompts
from tasks.latent_cache import build_latent_cache
from tasks.null_embedding import null_embedding
from tasks.sample import sample
from tasks.train import train

__all__ = ["build_latent_cache", "encode_prompts", "null_embedding", "sample", "train"]
