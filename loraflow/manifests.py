"""Manifests: the small JSON values tasks return and hand downstream.

A manifest names objects in the store by `ObjectRef`. Downstream cache keys hash a manifest's
`cache_token()`: its refs' content keys, without the bookkeeping counts.
"""

from __future__ import annotations

from pydantic import BaseModel

from loraflow.store import ObjectRef

BOOKKEEPING = {"computed", "reused"}


class Manifest(BaseModel):
    computed: int = 0  # items this task run produced
    reused: int = 0  # items it found intact in the store

    def refs(self) -> list[ObjectRef]:
        raise NotImplementedError

    def cache_token(self) -> dict:
        return {name: getattr(self, name) for name in type(self).model_fields if name not in BOOKKEEPING}


class Embeddings(Manifest):
    items: dict[str, ObjectRef]  # prompt text -> embedding

    def refs(self):
        return list(self.items.values())


class NullEmbedding(Manifest):
    embedding: ObjectRef

    def refs(self):
        return [self.embedding]


class Latents(Manifest):
    items: dict[str, ObjectRef]  # image sha256 -> latent

    def refs(self):
        return list(self.items.values())


class Example(BaseModel):
    """One training pair, joined by item, never by position in a shuffled loader."""

    image: str  # file name, for messages only
    latent: ObjectRef
    caption: ObjectRef
    size: tuple[int, int]  # (height, width) the image was cut to: its bucket, batched only with its own

    def cache_token(self) -> dict:
        return {"latent": self.latent, "caption": self.caption}  # renaming a file changes nothing


class Weights(Manifest):
    method: str
    final_step: int
    steps: dict[int, ObjectRef]  # exported weights at every checkpoint step, the final one included
    ema: dict[int, ObjectRef] = {}  # the EMA of the weights at the same steps (train.ema_decay)
    # Every step's loss, learning rate, gradient norm and time (a stored list). A record of how
    # training went, with wall-clock times in it: not part of what downstream keys hash.
    metrics: ObjectRef | None = None

    @property
    def final(self) -> ObjectRef:
        return self.steps[self.final_step]

    def refs(self):
        return [*self.steps.values(), *self.ema.values(), *([self.metrics] if self.metrics else [])]

    def cache_token(self) -> dict:
        return {name: value for name, value in super().cache_token().items() if name != "metrics"}


class SampleImage(BaseModel):
    prompt: str
    step: int
    index: int
    image: ObjectRef


class Samples(Manifest):
    images: list[SampleImage]

    def refs(self):
        return [s.image for s in self.images]
