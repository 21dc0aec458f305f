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
        parts = list(chunks)
        values = np.concatenate(parts) if parts else np.empty(0, dtype=DIGEST)
        return cls(np.unique(values))

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


def repeated(values: np.ndarray) -> np.ndarray:
    """The digests that occur more than once in `values` (each once)."""
    if len(values) < 2:
        return np.empty(0, dtype=values.dtype)
    ordered = np.sort(values)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
