"""encode-prompts: one embedding per prompt, encoding only prompts not already in the store.

Prompts are encoded in fixed-shape batches (`loraflow.batching`): an embedding's bytes depend on
its key and the batch size, never on which other prompts share its pass.
"""

from __future__ import annotations

from accelerate import PartialState
from prefect import get_run_logger, task

from loraflow.batching import GPU_PROMPT_BATCH, batch_size_for, chunks, padded_pass
from loraflow.config import EncoderConfig
from loraflow.families import get_family
from loraflow.hashing import content_key
from loraflow.manifests import Embeddings
from loraflow.models import Component
from loraflow.store import Store
from tasks.caching import ContentKey

# Key: text-encoder fingerprint (weights, config, tokenizer), encoder settings (all but
# `batch_size`, see `EncoderConfig.cache_token`), prompt texts.
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
        device = PartialState().device
        encoder = fam.load_text_encoder(text_encoder.path, settings, device)
        size = batch_size_for(settings.batch_size, device, GPU_PROMPT_BATCH)
        for batch in chunks(todo, size):
            embeddings = padded_pass(lambda texts: fam.encode(encoder, texts, settings), [p for p, _ in batch], size)
            for (prompt, key), tensors in zip(batch, embeddings):
                items[prompt] = store.put_tensors("embeddings", key, tensors)
    logger.info("%s: %d prompt(s) encoded, %d reused", role, len(todo), len(items) - len(todo))
    return Embeddings(items=items, computed=len(todo), reused=len(items) - len(todo))
