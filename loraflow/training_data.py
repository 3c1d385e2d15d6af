"""Training examples read from the store as steps need them, in bounded memory.

`train` asks for one batch of example indices per step. Each example's latent and caption
embedding are read from the store (checked against their checksum and key, as every read is) the
first time a step needs them and kept in a least-recently-used cache of at most `budget_bytes`;
a batch's missing items are fetched concurrently, which hides object-store latency. Memory is set
by the budget, not by the dataset: 100 images or 100,000 use the same. What is kept per example
is its row of the `Examples` table (numpy columns): under 150 bytes, 14 MB for 100,000 images.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from loraflow.manifests import Examples
from loraflow.store import ObjectRef, Store

Tensors = dict[str, torch.Tensor]


class StoreExamples(torch.utils.data.Dataset):
    """`examples[i]` as (latent tensors, caption tensors), read through a bounded cache."""

    def __init__(self, store: Store, examples: Examples, budget_bytes: int, readers: int = 8):
        self.store = store
        self.examples = examples
        self.budget_bytes = budget_bytes
        self.cached: OrderedDict[str, Tensors] = OrderedDict()  # object key -> tensors, oldest first
        self.cached_bytes = 0
        self.readers = ThreadPoolExecutor(readers, thread_name_prefix="loraflow-read")

    def __len__(self) -> int:
        return len(self.examples)

    def buckets(self) -> list[np.ndarray]:
        """Example indices by the size they were cut to, smallest size first (arrays: not a Python
        int per example)."""
        sizes, which = np.unique(self.examples.sizes, axis=0, return_inverse=True)
        return [np.flatnonzero(which.ravel() == i) for i in range(len(sizes))]

    def refs(self, index: int) -> tuple[ObjectRef, ObjectRef]:
        """Example `index`'s latent and caption embedding."""
        return self.examples.latent(index), self.examples.caption_of(index)

    def __getitem__(self, index: int) -> tuple[Tensors, Tensors]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensors, Tensors]]:
        pairs = [self.refs(i) for i in indices]
        refs = [ref for pair in pairs for ref in pair]
        found: dict[str, Tensors] = {}
        for ref in refs:
            if ref.key in self.cached:
                self.cached.move_to_end(ref.key)
                found[ref.key] = self.cached[ref.key]
        missing = list({ref.key: ref for ref in refs if ref.key not in found}.values())
        for ref, tensors in zip(missing, self.readers.map(self.store.read_tensors, missing)):
            found[ref.key] = tensors
            self._keep(ref.key, tensors)
        return [(found[latent.key], found[caption.key]) for latent, caption in pairs]

    def _keep(self, key: str, tensors: Tensors) -> None:
        self.cached[key] = tensors
        self.cached_bytes += size_of(tensors)
        while self.cached_bytes > self.budget_bytes and len(self.cached) > 1:
            _, evicted = self.cached.popitem(last=False)
            self.cached_bytes -= size_of(evicted)

    def close(self) -> None:
        self.readers.shutdown()


def size_of(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
