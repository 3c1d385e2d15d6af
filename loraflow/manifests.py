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
    """One shard's latents, one per image, as columns in image order: a 1,000-image shard's record
    parses into three lists of strings, not a thousand refs (the flow holds every shard's at once)."""

    images: list[str]  # image sha256
    # (Not `keys`: a model with a `keys` attribute is taken for a mapping by `dict(model)`, as Prefect does.)
    latents: list[str]  # its latent's key: the object is at `latent_path(key)`
    checksums: list[str]  # its latent's sha256 ("" in a plan)

    @classmethod
    def of(cls, latents: dict[str, ObjectRef], computed: int = 0, reused: int = 0) -> Latents:
        """From {image sha256: its stored latent}."""
        images = sorted(latents)
        for ref in latents.values():
            if ref.path != latent_path(ref.key):
                raise ValueError(f"{ref.path} is not where a latent of key {ref.key[:12]} is stored")
        return cls(images=images, latents=[latents[i].key for i in images], checksums=[latents[i].sha256 for i in images],
                   computed=computed, reused=reused)

    def refs(self):
        return [ObjectRef(path=latent_path(key), key=key, sha256=sha) for key, sha in zip(self.latents, self.checksums)]


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
    def from_rows(cls, rows: Iterable[tuple[str, str, str, ObjectRef, tuple[int, int]]]) -> Examples:
        """From (image name, latent key, latent checksum, caption embedding, size) rows, in any order."""
        rows = sorted(rows, key=lambda row: (row[1], row[3].key))
        index: dict[str, int] = {}
        captions: list[ObjectRef] = []
        for row in rows:
            if row[3].key not in index:
                index[row[3].key] = len(captions)
                captions.append(row[3])
        return cls(images=[row[0] for row in rows], latents=[row[1] for row in rows],
                   latent_sha256=[row[2] for row in rows], captions=captions,
                   caption=[index[row[3].key] for row in rows], sizes=[row[4] for row in rows])

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
