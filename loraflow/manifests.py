"""Manifests: the small JSON values tasks return and hand downstream.

A manifest names objects in the store by `ObjectRef`. Downstream cache keys hash a manifest's
`cache_token()`: its refs' content keys, without the bookkeeping counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np
from pydantic import BaseModel, model_validator
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy

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
    """Prompt embeddings as columns, in the order the prompts were given (sample prompts are drawn
    and shown in it): 100,000 captions parse into a list of strings and two packed columns, not a
    ref per prompt."""

    prompts: list[str]
    embeddings: str  # each prompt's embedding key, packed (`packed`): its object is `embedding_path(key)`
    checksums: str  # each embedding's sha256, packed ("" in a plan)

    @classmethod
    def of(cls, items: dict[str, ObjectRef], computed: int = 0, reused: int = 0) -> Embeddings:
        """From {prompt: its stored embedding}, in that order."""
        prompts = list(items)
        check_paths(items.values(), embedding_path)
        return cls(prompts=prompts, embeddings=packed(items[p].key for p in prompts),
                   checksums=packed(items[p].sha256 for p in prompts), computed=computed, reused=reused)

    @model_validator(mode="after")
    def _columns(self) -> Embeddings:
        check_columns(len(self.prompts), embeddings=self.embeddings, checksums=self.checksums)
        return self

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(embedding key, its checksum) as "S64" arrays, in prompt order (checksums b"" in a plan)."""
        keys = digest_array(self.embeddings)
        return keys, digest_array(self.checksums, len(keys))

    @property
    def items(self) -> dict[str, ObjectRef]:
        """{prompt: its embedding}."""
        return dict(zip(self.prompts, self.refs()))

    def refs(self):
        return [ObjectRef(path=embedding_path(key), key=key, sha256=sha)
                for key, sha in zip(unpacked(self.embeddings), unpacked(self.checksums, len(self.prompts)))]

    def cache_token(self) -> dict:
        # What the {prompt: ref} form of these columns hashed to: keys downstream (sample) stay as they were.
        return {"items": dict(zip(self.prompts, unpacked(self.embeddings)))}


class NullEmbedding(Manifest):
    embedding: ObjectRef

    def refs(self):
        return [self.embedding]


class Latents(Manifest):
    """One shard's latents, one per image, as packed columns in image order: a 4,096-image shard's
    record parses into three strings, not thousands (the flow holds every shard's at once)."""

    images: str  # each image's sha256, packed (`packed`), sorted
    latents: str  # its latent's key: the object is at `latent_path(key)`
    checksums: str  # its latent's sha256 ("" in a plan)

    @classmethod
    def of(cls, latents: dict[str, ObjectRef], computed: int = 0, reused: int = 0) -> Latents:
        """From {image sha256: its stored latent}."""
        images = sorted(latents)
        check_paths(latents.values(), latent_path)
        return cls(images=packed(images), latents=packed(latents[i].key for i in images),
                   checksums=packed(latents[i].sha256 for i in images), computed=computed, reused=reused)

    @model_validator(mode="after")
    def _columns(self) -> Latents:
        check_columns(len(self.images) // DIGEST, images=self.images, latents=self.latents, checksums=self.checksums)
        return self

    def checksum_array(self) -> np.ndarray:
        """Each latent's checksum as an "S64" array (b"" in a plan)."""
        return digest_array(self.checksums, len(self.latents) // DIGEST)

    def refs(self):
        count = len(self.latents) // DIGEST
        return [ObjectRef(path=latent_path(key), key=key, sha256=sha)
                for key, sha in zip(unpacked(self.latents), unpacked(self.checksums, count))]


@dataclass(eq=False)
class Examples:
    """Every training example: an image's latent, its caption's embedding and the size the image
    was cut to (its bucket: batched only with its own), joined by content, never by position in a
    shuffled loader, and in content order (latent key, then caption key).

    Kept as numpy columns and stored as one safetensors file of them: 100,000 examples are 14 MB,
    read and held without a Python object per example."""

    latents: np.ndarray  # "S64": each example's latent key (its object is at `latent_path(key)`)
    latent_sha256: np.ndarray  # "S64": that object's checksum
    captions: np.ndarray  # "S64": the distinct caption embeddings' keys (at `embedding_path(key)`)
    caption_sha256: np.ndarray  # "S64": their checksums
    caption: np.ndarray  # int32: each example's index in `captions`
    sizes: np.ndarray  # int32 (examples, 2): the (height, width) its image was cut to

    @classmethod
    def of(cls, latents: np.ndarray, latent_sha256: np.ndarray, captions: np.ndarray, caption_sha256: np.ndarray,
           caption: np.ndarray, sizes: np.ndarray) -> Examples:
        """From columns with examples in any order: put in content order."""
        order = np.lexsort((captions[caption], latents))  # by latent key, then caption key
        return cls(latents[order], latent_sha256[order], captions, caption_sha256,
                   caption[order].astype(np.int32), sizes[order].astype(np.int32).reshape(-1, 2))

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[ObjectRef, ObjectRef, tuple[int, int]]]) -> Examples:
        """From (latent, caption embedding, size) rows, in any order."""
        rows = list(rows)
        captions = list({row[1].key: row[1] for row in rows}.values())
        index = {ref.key: i for i, ref in enumerate(captions)}
        return cls.of(digest_array(row[0].key for row in rows), digest_array(row[0].sha256 for row in rows),
                      digest_array(ref.key for ref in captions), digest_array(ref.sha256 for ref in captions),
                      np.array([index[row[1].key] for row in rows], dtype=np.int32),
                      np.array([row[2] for row in rows], dtype=np.int32))

    def __len__(self) -> int:
        return len(self.latents)

    def latent(self, i: int) -> ObjectRef:
        key = self.latents[i].decode()
        return ObjectRef(path=latent_path(key), key=key, sha256=self.latent_sha256[i].decode())

    def caption_of(self, i: int) -> ObjectRef:
        """Example `i`'s caption embedding."""
        c = self.caption[i]
        key = self.captions[c].decode()
        return ObjectRef(path=embedding_path(key), key=key, sha256=self.caption_sha256[c].decode())

    def identity(self) -> str:
        """What a downstream key sees: each example's (latent, caption embedding) by content key, in
        order; not sizes. The key `content_key("list", [{"latent": ..., "caption": ...}, ...])` gives,
        hashed row by row from the columns instead of from a dict per example."""
        digest = hashlib.sha256(b'["list",[')
        for i, (caption, latent) in enumerate(zip(self.caption, self.latents)):
            digest.update(b'%s{"caption":"%s","latent":"%s"}' % (b"," if i else b"", self.captions[caption], latent))
        digest.update(b"]]")
        return digest.hexdigest()

    def stored(self, store: Store) -> ListRef:
        """This table as one stored object, handed to the train task by reference."""
        columns = {name: getattr(self, name) for name in EXAMPLE_COLUMNS}
        data = save_numpy({name: as_bytes(c) if c.dtype.kind == "S" else c for name, c in columns.items()})
        return store.put_named(data, count=len(self), identity=self.identity(), ext="safetensors")

    @classmethod
    def read(cls, store: Store, listed: ListRef) -> Examples:
        """The table a `stored` reference names, checked like every read."""
        table = cls.parse(store.read(listed.ref))
        if table is None or len(table) != listed.count:
            raise ValueError(f"{store.url_of(listed.ref.path)} is not a table of {listed.count} training examples")
        return table

    @classmethod
    def parse(cls, data: bytes) -> Examples | None:
        """The table in a stored file's bytes, or None if they are not one."""
        columns = load_numpy(data)
        if sorted(columns) != sorted(EXAMPLE_COLUMNS):
            return None
        table = cls(**{name: from_bytes(c) if c.dtype == np.uint8 else c for name, c in columns.items()})
        ok = (len(table.latent_sha256) == len(table.caption) == len(table.sizes) == len(table)
              and len(table.caption_sha256) == len(table.captions)
              and (len(table) == 0 or 0 <= table.caption.min() <= table.caption.max() < len(table.captions)))
        return table if ok else None


EXAMPLE_COLUMNS = [f.name for f in fields(Examples)]


def latent_path(key: str) -> str:
    return Store.object_path("latents", key, "safetensors")


def embedding_path(key: str) -> str:
    return Store.object_path("embeddings", key, "safetensors")


# --- packed columns -------------------------------------------------------------------------------
# A column of content keys or checksums (64 hex characters each) kept as one string, or as a numpy
# "S64" array: a long column costs its characters, not an object per value.
DIGEST = 64


def packed(digests: Iterable[str]) -> str:
    return "".join(digests)


def unpacked(column: str, count: int | None = None) -> list[str]:
    """The values of a packed column (`count` empty strings for an empty column: a plan's checksums)."""
    if not column and count:
        return [""] * count
    return [column[i:i + DIGEST] for i in range(0, len(column), DIGEST)]


def digest_array(digests: Iterable[str] | str, count: int | None = None) -> np.ndarray:
    """An "S64" array of digests, from a packed column or from the digests themselves (`count`
    empty values for an empty column: a plan's checksums). Read-only: a view of the column's bytes."""
    column = digests if isinstance(digests, str) else packed(digests)
    if not column and count:
        return np.zeros(count, f"S{DIGEST}")
    return np.frombuffer(column.encode("ascii"), dtype=f"S{DIGEST}")


def as_bytes(column: np.ndarray) -> np.ndarray:
    return column.view(np.uint8).reshape(len(column), -1)


def from_bytes(column: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(column).view(f"S{column.shape[1]}").reshape(-1)


def check_columns(count: int, **columns: str) -> None:
    for name, column in columns.items():
        if len(column) != count * DIGEST and not (name == "checksums" and column == ""):
            raise ValueError(f"{name}: {len(column)} characters, not {count} packed digests of {DIGEST}")


def check_paths(refs: Iterable[ObjectRef], path_of) -> None:
    for ref in refs:
        if ref.path != path_of(ref.key):
            raise ValueError(f"{ref.path} is not where an object of key {ref.key[:12]} is stored")


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
