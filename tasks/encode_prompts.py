"""encode-prompts: one embedding per prompt, encoding only prompts not already in the store."""

from __future__ import annotations

from accelerate import PartialState
from prefect import get_run_logger, task

from loraflow.config import EncoderConfig
from loraflow.families import get_family
from loraflow.hashing import content_key
from loraflow.manifests import Embeddings
from loraflow.models import Component
from loraflow.store import Store
from tasks.caching import ContentKey

# Key: text-encoder fingerprint (weights, config, tokenizer), encoder settings, prompt texts.
CACHE_KEY = ContentKey("family", "text_encoder", "settings", "prompts")


def embedding_key(family: str, text_encoder: Component, settings: EncoderConfig, prompt: str) -> str:
    return content_key("embedding", family, text_encoder, settings, prompt)


@task(name="encode-prompts", cache_policy=CACHE_KEY, result_serializer="json", task_run_name="encode-prompts[{role}]")
def encode_prompts(prompts: list[str], family: str, text_encoder: Component, settings: EncoderConfig,
                   store: Store, role: str) -> Embeddings:
    logger = get_run_logger()
    items, todo = {}, []
    for prompt in dict.fromkeys(prompts):
        key = embedding_key(family, text_encoder, settings, prompt)
        ref = store.find("embeddings", key, "safetensors")
        if ref:
            items[prompt] = ref
        else:
            todo.append((prompt, key))
    if todo:
        fam = get_family(family)
        encoder = fam.load_text_encoder(text_encoder.path, settings, PartialState().device)
        for prompt, key in todo:  # one at a time: an object's bytes depend on its key alone
            items[prompt] = store.put_tensors("embeddings", key, fam.encode(encoder, [prompt], settings)[0])
    logger.info("%s: %d prompt(s) encoded, %d reused", role, len(todo), len(items) - len(todo))
    return Embeddings(items=items, computed=len(todo), reused=len(items) - len(todo))
