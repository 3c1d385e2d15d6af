"""Content-defined shards: a long list cut by the leading bits of each item's sha256.

An item's shard depends on its own content and the shard count alone, so adding an image changes
one shard's list and leaves every other shard, and its cache record, as it was. The count is a
power of two chosen from the list's length (`dataset.shard_size` items per shard at most, on
average): it changes only when the list doubles or halves past a boundary, and then every shard
runs once more, finding all its items already stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from loraflow.store import ListRef, Store

T = TypeVar("T")


def shard_bits(count: int, shard_size: int) -> int:
    """log2 of the shard count: the smallest whose shards hold at most `shard_size` on average."""
    return math.ceil(math.log2(count / shard_size)) if count > shard_size else 0


def split(items: list[T], digest: Callable[[T], str], bits: int) -> dict[int, list[T]]:
    """{shard index: its items} by the first `bits` bits of `digest(item)` (a hex sha256), in
    index order; shards with no items are left out."""
    shards: dict[int, list[T]] = {}
    for item in items:
        shards.setdefault(int(digest(item)[:8], 16) >> (32 - bits) if bits else 0, []).append(item)
    return dict(sorted(shards.items()))


def store_shards(store: Store, items: list[T], digest: Callable[[T], str], shard_size: int,
                 stored: Callable[[list[T]], list] = list) -> dict[str, ListRef]:
    """{label ("3/16": shard 3 of 16): `stored(its items)` stored as one list} for `items` in
    content-defined shards (`stored` makes what is stored of a shard's items, one shard at a time)."""
    bits = shard_bits(len(items), shard_size)
    return {f"{index + 1}/{2 ** bits}": store.put_list(stored(part)) for index, part in split(items, digest, bits).items()}
