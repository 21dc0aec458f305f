"""Row-id sets that stay small at millions of rows: sorted 128-bit digests instead of Python strings."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
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


class RepeatedDigests:
    """Finds the digests that occur more than once among any number of them, in bounded memory.

    Up to `in_memory` digests are held in one array. Past that, the array is sorted and spilled to files on
    local disk, one file per leading byte, and emptied; equal digests share their leading byte, so `repeated`
    then checks each file on its own. Memory stays about 16 bytes x in_memory (16 MB by default) whatever the
    count: 10M ids spill 160 MB to disk instead of holding it.
    """

    PARTITIONS = 256

    def __init__(self, in_memory: int = 1_000_000):
        self.in_memory = max(1, in_memory)
        self.buffer = DigestBuffer(self.in_memory)  # untouched pages cost nothing until digests fill them
        self.spill_dir: Path | None = None

    def add(self, chunk: np.ndarray) -> None:
        while len(chunk):
            room = self.in_memory - self.buffer.used
            self.buffer.add(chunk[:room])
            chunk = chunk[room:]
            if self.buffer.used >= self.in_memory:
                self._spill()

    def _spill(self) -> None:
        values = self.buffer.sorted()
        if self.spill_dir is None:
            self.spill_dir = Path(tempfile.mkdtemp(prefix="unclip-ray-ids-"))
        leading = values.view(np.uint8).reshape(-1, DIGEST.itemsize)[:, 0]
        bounds = np.searchsorted(leading, np.arange(self.PARTITIONS + 1), side="left")
        for part in np.nonzero(bounds[1:] > bounds[:-1])[0]:
            with open(self.spill_dir / f"{part:03d}", "ab") as fh:
                values[bounds[part]:bounds[part + 1]].tofile(fh)
        self.buffer.used = 0  # the same array takes the next digests

    def repeated(self) -> np.ndarray:
        """Every digest added more than once (each once, sorted); the spill files are removed."""
        if self.spill_dir is None:
            return repeated_in_sorted(self.buffer.sorted())
        try:
            self._spill()
            found = []
            for path in sorted(self.spill_dir.iterdir()):
                values = np.fromfile(path, dtype=DIGEST)
                values.sort()
                found.append(repeated_in_sorted(values))
            return np.concatenate(found) if found else np.empty(0, dtype=DIGEST)
        finally:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None
