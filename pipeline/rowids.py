"""Row-id sets that stay small at millions of rows: sorted 128-bit digests instead of Python strings."""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

DIGEST = np.dtype("S16")
"""blake2b-128 of the id: 16 bytes a row (a Python str costs ~60), collisions negligible below 2^50 ids."""


def digest(row_id: str) -> bytes:
    return hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def digests(row_ids: Iterable[str]) -> np.ndarray:
    return np.fromiter((digest(i) for i in row_ids), dtype=DIGEST)


class IdSet:
    """An immutable set of row ids for membership tests; built from chunks of ids (e.g. Parquet batches)."""

    def __init__(self, sorted_digests: np.ndarray | None = None):
        self.sorted = sorted_digests if sorted_digests is not None else np.empty(0, dtype=DIGEST)

    @classmethod
    def from_chunks(cls, chunks: Iterable[np.ndarray]) -> IdSet:
        values = sorted_digests(chunks)
        if len(values) > 1:
            values = values[np.concatenate(([True], values[1:] != values[:-1]))]
        return cls(values)

    @classmethod
    def of(cls, row_ids: Iterable[str]) -> IdSet:
        return cls.from_chunks([digests(row_ids)])

    def __len__(self) -> int:
        return len(self.sorted)

    def __bool__(self) -> bool:
        return len(self.sorted) > 0

    def __contains__(self, row_id: str) -> bool:
        return bool(self.contains([row_id])[0])

    def contains(self, row_ids: Iterable[str]) -> np.ndarray:
        """One bool per id: whether it is in the set."""
        wanted = digests(row_ids)
        if not len(self.sorted) or not len(wanted):
            return np.zeros(len(wanted), dtype=bool)
        where = np.minimum(np.searchsorted(self.sorted, wanted), len(self.sorted) - 1)
        return self.sorted[where] == wanted


class DigestBuffer:
    """Digests gathered into one array and sorted in place: at 10M ids one 160 MB array, where collecting
    chunks, concatenating them and sorting a copy held three. `capacity`: how many to expect (it grows past)."""

    def __init__(self, capacity: int = 0):
        self.values, self.used = np.empty(max(capacity, 0), dtype=DIGEST), 0

    def add(self, chunk: np.ndarray) -> None:
        if self.used + len(chunk) > len(self.values):
            grown = np.empty(max(self.used + len(chunk), len(self.values) * 3 // 2), dtype=DIGEST)
            grown[:self.used] = self.values[:self.used]
            self.values = grown
        self.values[self.used:self.used + len(chunk)] = chunk
        self.used += len(chunk)

    def sorted(self) -> np.ndarray:
        values = self.values[:self.used]
        values.sort()
        return values


def sorted_digests(chunks: Iterable[np.ndarray], capacity: int = 0) -> np.ndarray:
    buffer = DigestBuffer(capacity)
    for chunk in chunks:
        buffer.add(chunk)
    return buffer.sorted()


def repeated_in_sorted(ordered: np.ndarray) -> np.ndarray:
    """The digests that occur more than once in an already sorted array (each once)."""
    same = ordered[1:] == ordered[:-1]
    return np.unique(ordered[1:][same])
