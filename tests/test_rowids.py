"""Row-id digests: membership sets and the bounded-memory search for repeated ids."""

from __future__ import annotations

import numpy as np

from pipeline.rowids import IdSet, RepeatedDigests, digests


def test_an_id_set_answers_membership():
    ids = IdSet.of(["a", "b", "b", "c"])
    assert len(ids) == 3 and "b" in ids and "d" not in ids
    assert ids.contains(["c", "x", "a"]).tolist() == [True, False, True]


def test_repeats_are_found_the_same_whether_the_digests_fit_in_memory_or_spill_to_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the spill files go, so the test can see them removed
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    rng = np.random.default_rng(3)
    ids = [f"row-{i}" for i in range(5000)]
    repeated = {ids[i] for i in rng.choice(5000, 40, replace=False)}
    # Each repeated id comes back in a later chunk, so its two copies are spilled in different files.
    stream = ids + sorted(repeated) + [sorted(repeated)[0]]
    chunks = [digests(stream[i:i + 700]) for i in range(0, len(stream), 700)]
    expected = np.unique(digests(sorted(repeated)))

    in_memory, spilled = RepeatedDigests(), RepeatedDigests(in_memory=900)
    for chunk in chunks:
        in_memory.add(chunk)
        spilled.add(chunk)
    assert spilled.spill_dir is not None and in_memory.spill_dir is None
    assert len(list(spilled.spill_dir.iterdir())) > 200  # one file per leading byte
    assert np.array_equal(in_memory.repeated(), expected)
    assert np.array_equal(spilled.repeated(), expected)
    assert list(tmp_path.iterdir()) == [], "the spill files are removed"


def test_no_repeats_is_an_empty_answer():
    finder = RepeatedDigests(in_memory=10)
    for start in range(0, 100, 30):
        finder.add(digests(f"id-{i}" for i in range(start, min(100, start + 30))))
    assert len(finder.repeated()) == 0
