"""encode-prompts: one embedding per prompt, encoding only prompts not already in the store.

Prompts are encoded in fixed-shape batches (`loraflow.batching`): an embedding's bytes depend on
its key and the batch size, never on which other prompts share its pass.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from loraflow.batching import GPU_PROMPT_BATCH, batch_size_for, chunks, padded_pass
from loraflow.config import EncoderConfig
from loraflow.families import get_family, loaded, pick_device
from loraflow.hashing import content_key
from loraflow.manifests import Embeddings
from loraflow.models import Component
from loraflow.progress import Progress
from loraflow.store import ListRef, Store, planned
from tasks.caching import ContentKey
from tasks.options import stage

# Key: text-encoder fingerprint (weights, config, tokenizer), encoder settings (all but
# `batch_size`, see `EncoderConfig.cache_token`), the prompt texts (the list's identity). Not the
# role: captions and sample prompts with the same texts share their record.
CACHE_KEY = ContentKey("family", "text_encoder", "settings", "prompts")


def embedding_key(family: str, text_encoder: Component, settings: EncoderConfig, prompt: str) -> str:
    return content_key("embedding", family, text_encoder, settings, prompt)


def predict(prompts: ListRef, family: str, text_encoder: Component, settings: EncoderConfig, store: Store,
            role: str) -> Embeddings:
    """What the task would return, by key (for `loraflow plan`)."""
    return Embeddings.of({p: planned("embeddings", embedding_key(family, text_encoder, settings, p), "safetensors")
                             for p in store.read_list(prompts)})


@task(**stage("encode-prompts"), cache_policy=CACHE_KEY, result_serializer="json", task_run_name="encode-prompts[{role}]")
def encode_prompts(prompts: ListRef, family: str, text_encoder: Component, settings: EncoderConfig,
                   store: Store, role: str) -> Embeddings:
    """Embeddings of the prompts in a stored list (sample prompts, or one shard of the captions)."""
    logger = get_run_logger()
    keys = {prompt: embedding_key(family, text_encoder, settings, prompt) for prompt in store.read_list(prompts)}
    found = store.find_many("embeddings", list(keys.values()), "safetensors")
    items = {prompt: found[key] for prompt, key in keys.items() if key in found}
    todo = [(prompt, key) for prompt, key in keys.items() if key not in found]
    if todo:
        fam = get_family(family)
        device = pick_device()
        encoder = loaded(fam.load_text_encoder, text_encoder.path, settings, device)
        size = batch_size_for(settings.batch_size, device, GPU_PROMPT_BATCH)
        progress = Progress(logger, role, len(todo), " prompts encoded")
        for batch in chunks(todo, size):
            embeddings = padded_pass(lambda texts: fam.encode(encoder, texts, settings), [p for p, _ in batch], size)
            for (prompt, key), tensors in zip(batch, embeddings):
                items[prompt] = store.put_tensors("embeddings", key, tensors)
            progress.advance(len(batch))
    logger.info("%s: %d prompt(s) encoded, %d reused", role, len(todo), len(items) - len(todo))
    result = Embeddings.of({prompt: items[prompt] for prompt in keys}, computed=len(todo), reused=len(items) - len(todo))
    store.vouch_for(result.refs())
    return result
