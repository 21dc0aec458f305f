"""Writers: every format through one interface, metadata rows for every input row, safe and unique keys."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.writer import METADATA_SCHEMA, ShardNumbers, ShardWriter, safe_key


def batch(n_ok=2, keep=2, size=8):
    rng = np.random.default_rng(0)
    ids = [f"row-{i}" for i in range(n_ok)] + ["bad"]
    n = len(ids)
    return {
        "id": np.array(ids, dtype=object), "prompt": np.array([f"prompt {i}" for i in range(n_ok)] + [""], dtype=object),
        "status": np.array(["ok"] * n_ok + ["error"], dtype=object),
        "error": np.array([""] * n_ok + ["prompt is empty"], dtype=object),
        "truncated": np.array([True] + [False] * (n - 1)), "seeds": np.arange(n * keep, dtype=np.int64).reshape(n, keep),
        "candidate": np.tile(np.array([2, 0], dtype=np.int32)[:keep], (n, 1)),
        "clip_score": np.tile(np.array([30.5, 20.25], dtype=np.float32)[:keep], (n, 1)),
        "candidate_scores": np.tile(np.array([20.25, 1.0, 30.5], dtype=np.float32), (n, 1)),
        "image": rng.integers(0, 256, (n, keep, size, size, 3), dtype=np.uint8),
        "_images_decoder": np.full(n, 3), "_seconds_decoder": np.full(n, 0.5),
    }


def writer(tmp_path, *sets):
    config = load_config(None, ["models.unclip=/x", *sets], input_path="in", output_path=str(tmp_path / "out"))
    return ShardWriter(config, ShardNumbers()), tmp_path / "out"


@pytest.mark.parametrize("image_format,extension,lossless", [("png", "png", True), ("webp", "webp", False),
                                                            ("jpeg", "jpg", False)])
def test_files_format_writes_one_object_per_kept_image(tmp_path, image_format, extension, lossless):
    write, out = writer(tmp_path, f"output.image_format={image_format}", "output.quality=90")
    data = batch()
    result = write(data)
    assert result["rows"].tolist() == [3] and result["ok"].tolist() == [2] and result["error"].tolist() == [1]
    assert result["images"].tolist() == [4] and result["_images_decoder"].tolist() == [9]
    table = pq.read_table(out / "metadata")
    assert table.schema.equals(METADATA_SCHEMA)
    rows = table.to_pylist()
    assert [r["id"] for r in rows].count("bad") == 1 and len(rows) == 5
    bad = next(r for r in rows if r["id"] == "bad")
    assert bad["status"] == "error" and bad["error"] == "prompt is empty" and bad["image_key"] is None
    for row in (r for r in rows if r["status"] == "ok"):
        assert row["image_key"] == f"images/{row['id']}_{row['candidate']}.{extension}"
        with Image.open(out / row["image_key"]) as image:
            pixels = np.asarray(image.convert("RGB"))
        original = data["image"][int(row["id"][-1]), row["rank"]]
        if lossless:
            assert np.array_equal(pixels, original)
        assert (row["width"], row["height"]) == (8, 8) and row["candidate_scores"] == [20.25, 1.0, 30.5]
    assert next(r for r in rows if r["id"] == "row-0")["truncated"] is True


def test_webdataset_shards_read_back_with_the_webdataset_library(tmp_path):
    import webdataset as wds

    write, out = writer(tmp_path, "output.format=webdataset")
    data = batch()
    write(data)
    shards = sorted((out / "shards").glob("*.tar"))
    assert [s.stem for s in shards] == ["00000"]
    samples = list(wds.WebDataset(str(shards[0]), shardshuffle=False))
    assert len(samples) == 4
    for sample in samples:
        meta = json.loads(sample["json"])
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        row = int(meta["id"][-1])
        assert np.array_equal(image, data["image"][row, meta["rank"]])
        assert sample["__key__"] == f"{meta['id']}_{meta['candidate']}" and meta["seed"] == data["seeds"][row, meta["rank"]]
    table = pq.read_table(out / "metadata").to_pylist()
    assert {r["shard"] for r in table} == {shards[0].stem}


def test_rewriting_the_same_rows_replaces_the_same_objects(tmp_path):
    write, out = writer(tmp_path, "output.format=webdataset")
    write(batch())
    write(batch())
    assert len(list((out / "shards").glob("*.tar"))) == 1 and len(list((out / "metadata").iterdir())) == 1
    assert not [p for p in out.rglob(".*")], "no in-progress files are left behind"


UNTRUSTED_IDS = ["../../etc/passwd", "/absolute/path", "a/b", "a_b", "a.b", "ctrl\x01char", "new\nline", "x" * 500,
                 "naïve café", "", ".", "..", "spaces in id"]


def test_keys_from_untrusted_ids_are_safe_bounded_and_unique():
    ids = UNTRUSTED_IDS + [safe_key("a/b")]  # an id that imitates another id's hashed key
    keys = [safe_key(i) for i in ids]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,100}", key), key
    assert safe_key("plain-id_1") == "plain-id_1"


def test_an_error_row_records_the_seed_it_was_given_or_none(tmp_path):
    write, out = writer(tmp_path)
    n = 3
    write({"id": np.array(["negative", "too-big", "bad-prompt"], dtype=object),
           "prompt": np.array(["a", "b", ""], dtype=object), "status": np.array(["error"] * n, dtype=object),
           "error": np.array(["seed -1 is out of range", f"seed {2**64 - 1} is out of range", "prompt is empty"],
                             dtype=object),
           "truncated": np.zeros(n, dtype=bool),
           # The reader leaves a rejected seed's candidate seeds at 0; the row's own value travels beside them.
           "seeds": np.array([[0, 0], [0, 0], [2**63 - 1, 0]], dtype=np.int64),
           "row_seed": np.array([-1, 0, 2**63 - 1], dtype=np.int64), "row_seed_known": np.array([True, False, True])})
    recorded = {r["id"]: r["seed"] for r in pq.read_table(out / "metadata").to_pylist()}
    assert recorded == {"negative": -1, "too-big": None, "bad-prompt": 2**63 - 1}


def test_image_mode_metadata_names_sources_frames_and_embeddings(tmp_path):
    # A textdiff batch as the stages hand it on: one row, 2 trajectories x 3 frames, plus an error row.
    write, out = writer(tmp_path, "mode=textdiff", "textdiff.frames=3", "rerank.candidates=2", "rerank.keep=2",
                        "output.save_embeddings=true")
    rng = np.random.default_rng(1)
    data = {
        "id": np.array(["a", "b"], dtype=object), "prompt": np.array(["cat", ""], dtype=object),
        "status": np.array(["ok", "error"], dtype=object), "error": np.array(["", "image is null"], dtype=object),
        "truncated": np.zeros(2, bool), "seeds": np.array([[5, 5, 5, 6, 6, 6]] * 2, dtype=np.int64),
        "image": rng.integers(0, 256, (2, 6, 4, 4, 3), dtype=np.uint8),
        "image_embeds": rng.normal(size=(2, 6, 8)).astype(np.float32),
        "frame_theta": np.array([[0.0, 0.2, 0.4], [0.0, 0.0, 0.0]]),
        "source": np.array(["s3://b/cat.png", ""], dtype=object),  # "" and 0: unknown
        "source_sha256": np.array(["ab" * 32, ""], dtype=object),
        "source_width": np.array([40, 0], np.int32), "source_height": np.array([30, 0], np.int32),
        "target_prompt": np.array(["dog", "dog"], dtype=object),
    }
    write(data)
    table = pq.read_table(out / "metadata")
    assert {"mode", "source", "source_sha256", "source_width", "source_height", "frame", "theta", "target_prompt",
            "image_embedding"} <= set(table.schema.names)
    rows = {(r["id"], r["candidate"], r["frame"]): r for r in table.to_pylist()}
    assert len(rows) == 7
    assert (rows[("b", None, None)]["source"], rows[("b", None, None)]["source_width"]) == (None, None)
    for index in range(6):
        candidate, frame = divmod(index, 3)
        row = rows[("a", candidate, frame)]
        assert row["seed"] == 5 + candidate and row["theta"] == pytest.approx(0.2 * frame)
        assert row["image_key"] == f"images/a_{candidate}_{frame}.png"
        assert np.allclose(row["image_embedding"], data["image_embeds"][0, index])
        assert (row["mode"], row["source"], row["source_width"], row["source_height"], row["target_prompt"]) == (
            "textdiff", "s3://b/cat.png", 40, 30, "dog")
        with Image.open(out / row["image_key"]) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), data["image"][0, index])

