"""`ByteLRU`: a least-recently-used cache bounded by entries and by bytes, for the values replicas
keep between requests (embeddings by prompt and by image). Ray-free; the owner exports its size.

A value's size is the bytes of the numpy arrays in it (an array, or a dataclass or tuple of them)
plus its key's strings: an SDXL prompt's embeddings are about 1.3 MB, so an entry count alone
lets a cache of 1024 prompts hold over a gigabyte.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import numpy as np


def size_of(value: Any) -> int:
    """Approximate bytes held by `value`: arrays' buffers, strings' lengths, containers' items."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, tuple | list):
        return sum(size_of(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(size_of(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 8


class ByteLRU:
    """Holds at most `max_entries` values and `max_bytes` bytes; the least recently used go first.
    A value larger than `max_bytes` on its own is not kept."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        """The value, now the most recently used; None when absent."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = size_of(value) + size_of(key)
        self._drop(key)
        if size > self.max_bytes or self.max_entries == 0:
            return
        self._items[key] = (value, size)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[1]
