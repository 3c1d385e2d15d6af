"""Manifests: the small JSON values tasks return and hand downstream.

A manifest names objects in the store by `ObjectRef`. Downstream cache keys hash a manifest's
`cache_token()`: its refs' content keys, without the bookkeeping counts.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel

from loraflow.hashing import content_key
from loraflow.store import ListRef, ObjectRef, Store

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


class Examples(BaseModel):
    """Every training example: an image's latent, its caption's embedding and the size the image
    was cut to (its bucket: batched only with its own), joined by content, never by position in a
    shuffled loader, and in content order (latent key, then caption key).

    Kept as columns, one string or number per example and each distinct caption embedding once:
    100,000 examples are a few tens of MB to parse and hold, not a Python object per example."""

    images: list[str]  # file names, for messages only
    latents: list[str]  # each example's latent key (its object is `LATENTS`' path for the key)
    latent_sha256: list[str]
    captions: list[ObjectRef]  # the distinct caption embeddings
    caption: list[int]  # each example's index in `captions`
    sizes: list[tuple[int, int]]  # (height, width)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, ObjectRef, ObjectRef, tuple[int, int]]]) -> Examples:
        """From (image name, latent, caption embedding, size) rows, in any order."""
        rows = sorted(rows, key=lambda row: (row[1].key, row[2].key))
        index: dict[str, int] = {}
        captions: list[ObjectRef] = []
        for _, latent, caption, _ in rows:
            if latent.path != latent_path(latent.key):
                raise ValueError(f"{latent.path} is not where a latent of key {latent.key[:12]} is stored")
            if caption.key not in index:
                index[caption.key] = len(captions)
                captions.append(caption)
        return cls(images=[row[0] for row in rows], latents=[row[1].key for row in rows],
                   latent_sha256=[row[1].sha256 for row in rows], captions=captions,
                   caption=[index[row[2].key] for row in rows], sizes=[row[3] for row in rows])

    def __len__(self) -> int:
        return len(self.latents)

    def latent(self, i: int) -> ObjectRef:
        return ObjectRef(path=latent_path(self.latents[i]), key=self.latents[i], sha256=self.latent_sha256[i])

    def identity(self) -> str:
        """What a downstream key sees: each example's (latent, caption embedding) by content key, in
        order; not names or sizes. (The same key as hashing the list of pairs.)"""
        return content_key("list", [{"latent": latent, "caption": self.captions[c].key}
                                    for latent, c in zip(self.latents, self.caption)])

    def stored(self, store: Store) -> ListRef:
        """This table as one stored object, handed to the train task by reference."""
        return store.put_named(self.model_dump_json().encode(), count=len(self), identity=self.identity())


def latent_path(key: str) -> str:
    return Store.object_path("latents", key, "safetensors")


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
