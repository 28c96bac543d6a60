"""`ByteLRU`: bounded by entries and by bytes, least recently used out first, sizes counted from the
arrays a value holds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.caching import ByteLRU, size_of


@dataclass
class Pair:
    a: np.ndarray
    b: np.ndarray


def test_sizes_count_arrays_and_key_strings() -> None:
    pair = Pair(np.zeros((77, 2048), np.float32), np.zeros(1280, np.float32))
    assert size_of(pair) == 77 * 2048 * 4 + 1280 * 4
    assert size_of(("text", "model", "a prompt")) == 4 + 5 + 8


def test_the_byte_bound_evicts_least_recently_used() -> None:
    lru = ByteLRU(max_entries=100, max_bytes=3000)
    for key in "abc":
        lru.put(key, np.zeros(999, np.uint8))  # 999 + 1 bytes of key each
    assert len(lru) == 3 and lru.bytes == 3000
    assert lru.get("a") is not None  # "b" is now the least recently used
    lru.put("d", np.zeros(999, np.uint8))
    assert lru.get("b") is None and lru.get("a") is not None and lru.get("d") is not None
    assert lru.bytes == 3000


def test_the_entry_bound_and_oversized_values() -> None:
    lru = ByteLRU(max_entries=2, max_bytes=10_000)
    for key in "abc":
        lru.put(key, np.zeros(10, np.uint8))
    assert len(lru) == 2 and lru.get("a") is None
    lru.put("huge", np.zeros(20_000, np.uint8))
    assert lru.get("huge") is None and len(lru) == 2
    lru.put("b", np.zeros(100, np.uint8))  # replacing a key re-counts it
    assert lru.bytes == 101 + 11
    assert ByteLRU(0, 10_000).get("x") is None
