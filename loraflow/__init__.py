"""loraflow: cached, resumable fine-tuning of text-to-image diffusion models as a Prefect flow."""

__version__ = "0.1.0"

# Part of every task's cache key. Bump it when a change to loraflow's code changes what a stage
# produces for the same inputs, so old cache records are not reused.
CACHE_VERSION = "3"
