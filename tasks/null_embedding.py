"""null-embedding: the encoder's output for the empty prompt (with its mask where the family has one).

Used for classifier-free guidance when sampling and for caption dropout when training. The flow
asks for it whenever either needs it; no setting can skip it.
"""

from __future__ import annotations

from prefect import task

from loraflow.config import EncoderConfig
from loraflow.families import get_family, pick_device
from loraflow.hashing import content_key
from loraflow.manifests import NullEmbedding
from loraflow.models import Component
from loraflow.store import Store, planned
from tasks.caching import ContentKey
from tasks.options import stage

# Key: text-encoder fingerprint and encoder settings.
CACHE_KEY = ContentKey("family", "text_encoder", "settings")


def null_key(family: str, text_encoder: Component, settings: EncoderConfig) -> str:
    return content_key("null-embedding", family, text_encoder, settings)


def predict(family: str, text_encoder: Component, settings: EncoderConfig, store: Store) -> NullEmbedding:
    """What the task would return, by key (for `loraflow plan`)."""
    return NullEmbedding(embedding=planned("null", null_key(family, text_encoder, settings), "safetensors"))


@task(**stage("null-embedding"), task_run_name="null-embedding", cache_policy=CACHE_KEY, result_serializer="json")
def null_embedding(family: str, text_encoder: Component, settings: EncoderConfig, store: Store) -> NullEmbedding:
    key = null_key(family, text_encoder, settings)
    ref = store.find("null", key, "safetensors")
    if ref:
        return NullEmbedding(embedding=ref, reused=1)
    fam = get_family(family)
    encoder = fam.load_text_encoder(text_encoder.path, settings, pick_device())
    embedding = fam.null_embedding(encoder, settings)
    return NullEmbedding(embedding=store.put_tensors("null", key, embedding), computed=1)
