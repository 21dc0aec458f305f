"""Input: run-level problems stop before any work with one line; row-level problems become error rows."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import seeds
from pipeline.config import load_config
from pipeline.reader import InputError, RowPreparer, derived_id, preflight, validate_prompt
from pipeline.rowids import IdSet
from tests.conftest import FAST_STEPS, ONE_GPU, model_overrides, write_prompts


def config(path, *sets):
    return load_config(None, ["models.unclip=/x", *sets], input_path=str(path), output_path="out")


RUN_LEVEL = {
    "missing column": (lambda d: write_prompts(d / "a.parquet", ["x"]), ["input.prompt_column=caption"],
                       r"has no column 'caption' \(columns: prompt\); set input.prompt_column"),
    "missing path": (lambda d: str(d / "nothing.parquet"), [], r"nothing.parquet does not exist"),
    "empty glob": (lambda d: str(d / "*.parquet"), [], r"matches no Parquet files"),
    "corrupt parquet": (lambda d: (d / "bad.parquet").write_bytes(b"PAR1 definitely not parquet") and
                        str(d / "bad.parquet"), [], r"bad.parquet is not a readable Parquet file"),
    "duplicate ids": (lambda d: write_prompts(d / "a.parquet", ["x", "y", "z"], id=["1", "2", "1"]), [],
                      r"duplicate id '1' in input column 'id'"),
    "float seeds": (lambda d: write_prompts(d / "a.parquet", ["x"], seed=[1.5]), [],
                    r"input column 'seed' .* is double, expected int64 seeds"),
    "explicit id column missing": (lambda d: write_prompts(d / "a.parquet", ["x"]), ["input.id_column=idx"],
                                   r"has no column 'idx' set as input.id_column \(columns: prompt\); name an "
                                   r"existing column, or unset input.id_column"),
    "explicit seed column missing": (lambda d: write_prompts(d / "a.parquet", ["x"], seed=[1]),
                                     ["input.seed_column=s"], r"has no column 's' set as input.seed_column"),
    "mixed optional columns": (lambda d: (write_prompts(d / "a.parquet", ["x"], id=["1"]),
                                          write_prompts(d / "b.parquet", ["y"]), str(d))[-1], [],
                               r"differs from the others in having 'id' or 'seed' columns"),
}


@pytest.mark.parametrize("case", list(RUN_LEVEL))
def test_run_level_input_problems_are_one_clear_line(tmp_path, case):
    make, sets, message = RUN_LEVEL[case]
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        preflight(config(path, *sets))
    assert "\n" not in str(info.value)


def test_directory_glob_and_file_inputs(tmp_path):
    for name in ("a", "b"):
        write_prompts(tmp_path / f"{name}.parquet", [name])
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.parquet").write_bytes(b"junk")
    assert preflight(config(tmp_path)).rows == 2
    assert preflight(config(tmp_path / "a*.parquet")).rows == 1
    info = preflight(config(tmp_path / "b.parquet"))
    assert info.rows == 1 and not info.has_id and not info.has_seed


@pytest.mark.parametrize("value,reason", [(None, "prompt is null"), ("", "prompt is empty"),
                                          ("  \t\n", "prompt is whitespace only"), (7, "prompt is int, expected a string"),
                                          (b"bytes", "prompt is bytes, expected a string"), ("a cat", None)])
def test_prompt_validation(value, reason):
    assert validate_prompt(value) == reason


def test_rows_get_ids_seeds_and_errors(tmp_path):
    path = write_prompts(tmp_path / "p.parquet", ["a", "b", None, "c"], seed=pa.array([10, None, 3, -4], pa.int64()))
    cfg = config(path, "rerank.candidates=3", "rerank.keep=1", "models.clip=/c", "seed=5")
    info = preflight(cfg)
    table = pq.read_table(path).append_column("path", pa.array([path] * 4)).append_column(
        "row_hash", pa.array([1, 2, 3, 4], pa.uint64()))
    out = RowPreparer(cfg, info)(table)
    assert out["id"].tolist() == [derived_id(path, h) for h in (1, 2, 3, 4)]
    assert re.fullmatch(r"p-[0-9a-f]{16}", out["id"][0])
    assert out["seeds"][0].tolist() == [10, 11, 12]
    base = seeds.derived_base_seed(5, out["id"][1])
    assert out["seeds"][1].tolist() == [base, base + 1, base + 2], "a null seed falls back to the derivation"
    assert out["status"].tolist() == ["ok", "ok", "error", "error"]
    assert out["error"][2] == "prompt is null" and "seed -4 is out of range" in out["error"][3]
    assert out["row_seed"].tolist() == [10, base, 3, -4] and out["row_seed_known"].all()
    done = RowPreparer(cfg, info, done_ids=IdSet.of([out["id"][0]]))(table)
    assert out["id"][0] not in done["id"].tolist() and len(done["id"]) == 3


def test_a_seed_int64_cannot_hold_is_an_error_row_with_no_seed(tmp_path):
    path = write_prompts(tmp_path / "u.parquet", ["a", "b", "c"], id=["big", "edge", "fine"],
                         seed=pa.array([2**64 - 1, 2**63, 2**63 - 1], pa.uint64()))
    cfg = config(path)
    out = RowPreparer(cfg, preflight(cfg))(pq.read_table(path))
    assert out["status"].tolist() == ["error", "error", "ok"]
    assert f"seed {2**64 - 1} is out of range" in out["error"][0] and f"seed {2**63} is out of range" in out["error"][1]
    assert out["row_seed_known"].tolist() == [False, False, True] and out["row_seed"][2] == 2**63 - 1
    assert out["seeds"][2].tolist() == [2**63 - 1]


def test_64_bit_seeds_and_integer_ids_are_exact_through_ray_data(ray_session, tmp_path):
    from pipeline.progress import ProgressPrinter
    from pipeline.reader import read_prompts
    from pipeline.writer import ShardNumbers, ShardWriter

    # Nulls make Arrow hand these int64 columns to numpy as float64, which cannot hold the values exactly.
    ids = pa.array([12, None, 7, 2**62 + 1, None, 3], pa.int64())
    given = [2**63 - 1, None, 2**63 - 5, 2**53 + 1, -1, None]
    path = write_prompts(tmp_path / "prompts.parquet", [f"prompt {i}" for i in range(6)], id=ids,
                         seed=pa.array(given, pa.int64()))
    output = tmp_path / "out"
    cfg = load_config(None, ["models.unclip=/x", "models.clip=/c", "rerank.candidates=2", "rerank.keep=2", "seed=5"],
                      input_path=path, output_path=str(output))
    info = preflight(cfg)

    def with_images(batch):  # stands in for the stages: every kept candidate gets an 8x8 image
        return {**batch, "image": np.zeros(batch["seeds"].shape + (8, 8, 3), dtype=np.uint8)}

    rows = read_prompts(cfg, info).take_all()
    by_prompt = {row["prompt"]: row for row in rows}
    assert [by_prompt[f"prompt {i}"]["id"] for i in (0, 2, 3, 5)] == ["12", "7", str(2**62 + 1), "3"]
    assert all(re.fullmatch(r"prompts-[0-9a-f]{16}", by_prompt[p]["id"]) for p in ("prompt 1", "prompt 4"))
    base_1, base_5 = (seeds.derived_base_seed(5, by_prompt[p]["id"]) for p in ("prompt 1", "prompt 5"))
    expected = {"prompt 0": [2**63 - 1, 0], "prompt 1": [base_1, (base_1 + 1) % 2**63],
                "prompt 2": [2**63 - 5, 2**63 - 4], "prompt 3": [2**53 + 1, 2**53 + 2],
                "prompt 5": [base_5, (base_5 + 1) % 2**63]}
    for prompt, candidate_seeds in expected.items():
        assert [int(s) for s in by_prompt[prompt]["seeds"]] == candidate_seeds, prompt
        assert by_prompt[prompt]["status"] == "ok", by_prompt[prompt]["error"]
    assert by_prompt["prompt 4"]["status"] == "error" and "seed -1 is out of range" in by_prompt["prompt 4"]["error"]

    board = ProgressPrinter("reader-test-board", [], total_rows=6, interval_s=3600, shard_numbers=ShardNumbers())
    try:
        read_prompts(cfg, info).map_batches(with_images, batch_format="numpy").map_batches(
            ShardWriter(cfg, "reader-test-board"), batch_format="numpy").materialize()
    finally:
        board.close()
    recorded = {(r["prompt"], r["candidate"] or 0): r for r in pq.read_table(output / "metadata").to_pylist()}
    for prompt, candidate_seeds in expected.items():
        assert [recorded[(prompt, j)]["seed"] for j in (0, 1)] == candidate_seeds, prompt
    assert recorded[("prompt 0", 0)]["id"] == "12"
    assert recorded[("prompt 4", 0)]["status"] == "error" and recorded[("prompt 4", 0)]["seed"] == -1


BAD_ROWS = [  # (id, prompt, expected status, expected error or truncated flag)
    ("ok-1", "a red fox", "ok", None),
    ("../../etc/passwd", "a blue bird", "ok", None),
    ("/abs/path", "a green frog", "ok", None),
    ("ctrl\x01id", "a yellow cat", "ok", None),
    ("a" * 300, "an orange dog", "ok", None),
    ("null-prompt", None, "error", "prompt is null"),
    ("empty-prompt", "", "error", "prompt is empty"),
    ("blank-prompt", "   ", "error", "prompt is whitespace only"),
    ("long-prompt", " ".join(["word"] * 120), "ok", "truncated"),
]


def test_bad_rows_become_error_rows_and_every_row_is_accounted_once(tiny_models, ray_session, tmp_path):
    from pipeline.run import generate

    folder = tmp_path / "prompts"
    folder.mkdir()
    write_prompts(folder / "a.parquet", [p for _, p, _, _ in BAD_ROWS], id=[i for i, _, _, _ in BAD_ROWS])
    write_prompts(folder / "b.parquet", [42, 43], id=["int-1", "int-2"], prompt_type=pa.int64())
    output = tmp_path / "out"
    result = generate(load_config(None, FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False)
                                  + ONE_GPU,
                                  input_path=str(folder), output_path=str(output)))
    rows = pq.read_table(output / "metadata").to_pylist()
    by_id = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    expected = {i: (status, note) for i, _, status, note in BAD_ROWS}
    expected.update({"int-1": ("error", "prompt is int, expected a string"),
                     "int-2": ("error", "prompt is int, expected a string")})
    assert set(by_id) == set(expected) and all(len(v) == 1 for v in by_id.values()), "each row exactly once"
    for row_id, (status, note) in expected.items():
        row = by_id[row_id][0]
        assert row["status"] == status, row
        if status == "error":
            assert row["error"] == note and row["image_key"] is None
        else:
            assert row["truncated"] is (note == "truncated")
            assert re.fullmatch(r"images/[A-Za-z0-9_-]{1,100}\.png", row["image_key"]), row["image_key"]
            assert (output / row["image_key"]).is_file()
    keys = [r["image_key"] for r in rows if r["image_key"]]
    assert len(keys) == len(set(keys))
    assert all(p.resolve().is_relative_to(output.resolve()) for p in output.rglob("*"))
    assert result.summary["counts"] == {**result.summary["counts"], "ok": 6, "error": 5, "input_rows": 11}


def test_limit_reads_the_first_rows_with_the_ids_they_have_in_the_whole_input(ray_session, tmp_path):
    from pipeline.reader import read_prompts

    # Row groups of 2 rows: Ray Data reads the cut file in several blocks, so positions are not block-local.
    for name, first in (("a", 0), ("b", 5), ("c", 10)):
        pq.write_table(pa.table({"prompt": [f"p{first + i}" for i in range(5)]}), tmp_path / f"{name}.parquet",
                       row_group_size=2)
    whole = config(tmp_path)
    limited = config(tmp_path, "input.limit=7")
    full_info, info = preflight(whole), preflight(limited)
    assert (full_info.rows, info.rows) == (15, 7)
    assert [p.rsplit("/", 1)[1] for p in info.files] == ["a.parquet", "b.parquet"]
    assert info.fingerprint != full_info.fingerprint  # a finished limited run is not the finished whole input
    assert preflight(config(tmp_path, "input.limit=15")).fingerprint == full_info.fingerprint
    rows = read_prompts(limited, info).take_all()
    assert sorted(r["prompt"] for r in rows) == sorted(f"p{i}" for i in range(7))
    ids_whole = {r["prompt"]: r["id"] for r in read_prompts(whole, full_info).take_all()}
    assert all(r["id"] == ids_whole[r["prompt"]] for r in rows)


@pytest.mark.parametrize("value", [0, -3, "ten", True])
def test_a_limit_is_a_positive_row_count(tmp_path, value):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"input.limit must be a whole number of rows >= 1"):
        config(write_prompts(tmp_path / "a.parquet", ["x"]), f"input.limit={value}")


@pytest.mark.parametrize("mode,columns,message", [
    ("variation", {"prompt": ["x"]}, r"has no column 'image' .*variation mode needs each row's image"),
    ("variation", {"image": pa.array([1], pa.int64())}, r"column 'image' .* is int64, expected encoded image bytes"),
    ("interpolation", {"image_a": ["a.png"]}, r"has no column 'image_b' .*interpolation mode needs"),
    ("textdiff", {"image": ["a.png"]}, r"has no column 'target_prompt' .*the caption each image moves toward"),
    ("variation", {"image_embedding": ["1,2"]}, r"'image_embedding' .* is string, expected a list of floats"),
    ("textdiff", {"image": ["a.png"], "target_prompt": ["b"], "theta_max": ["high"]},
     r"'theta_max' .* is string, expected numbers in \(0, 1\]"),
    ("interpolation", {"image_a": ["a.png"], "image_b": ["b.png"], "frames": [2.5]},
     r"'frames' .* is double, expected integers from 2 to interpolation.frames \(null: interpolation.frames\)"),
])
def test_image_modes_need_their_columns(tmp_path, mode, columns, message):
    pq.write_table(pa.table(columns), tmp_path / "a.parquet")
    with pytest.raises(InputError, match=message):
        preflight(config(tmp_path / "a.parquet", f"mode={mode}"))


def test_variations_without_captions_keep_every_candidate(tmp_path):
    pq.write_table(pa.table({"image": ["a.png"]}), tmp_path / "a.parquet")
    info = preflight(config(tmp_path / "a.parquet", "mode=variation", "models.clip=/c", "rerank.candidates=2",
                            "rerank.keep=2"))
    assert not info.has_prompt and info.image_columns == ["image"]
    with pytest.raises(InputError, match=r"no 'prompt' column to rerank variation candidates by"):
        preflight(config(tmp_path / "a.parquet", "mode=variation", "models.clip=/c", "rerank.candidates=2"))


def test_image_paths_and_image_bytes_from_different_files_stay_apart_when_ray_merges_their_blocks(ray_session,
                                                                                               tmp_path):
    from pipeline import images
    from pipeline.reader import read_prompts

    # A Parquet column is either string (paths / URLs) or binary (encoded bytes), so an input mixing both is two
    # files; a batch that merges rows of both (a larger actor batch, a repartition) must still tell them apart.
    (tmp_path / "in").mkdir()
    paths = {"path-1": "s3://bucket/one.png", "path-2": "/data/two.png", "path-none": None}
    blobs = {"bytes-1": b"\x89PNG one", "bytes-2": b"\x89PNG two", "bytes-none": None}
    for name, rows, kind in (("paths", paths, pa.string()), ("blobs", blobs, pa.binary())):
        pq.write_table(pa.table({"id": list(rows), "image": pa.array(list(rows.values()), kind)}),
                       tmp_path / "in" / f"{name}.parquet")
    cfg = config(tmp_path / "in", "mode=variation")
    merged = next(iter(read_prompts(cfg, preflight(cfg)).repartition(1).iter_batches(batch_size=None,
                                                                                      batch_format="numpy")))
    assert len(merged["id"]) == 6
    given = {**paths, **blobs}
    assert {row_id: images.source_value(merged, "image", i) for i, row_id in enumerate(merged["id"])} == given


def test_the_reader_lists_its_files_without_a_pool_of_footer_reading_actors(ray_session, tmp_path):
    from pipeline.reader import read_prompts

    # Ray Data's default Parquet reader lists files with a ListFiles step that starts and kills 32 footer-reading
    # actors for every read (seconds of process start-up per run); the reader asks for the one that does not.
    path = write_prompts(tmp_path / "prompts.parquet", ["a", "b", "c"])
    cfg = config(path)
    dataset = read_prompts(cfg, preflight(cfg))
    names, todo = [], [dataset._logical_plan.dag]  # Ray Data's logical operators, from the last one up
    while todo:
        operator = todo.pop()
        names.append(operator.name)
        todo.extend(operator.input_dependencies)
    assert any("Parquet" in name for name in names) and not any("ListFiles" in name for name in names), names
    assert sorted(row["prompt"] for row in dataset.take_all()) == ["a", "b", "c"]
    assert ray_session.data.DataContext.get_current().use_datasource_v2, "the context is left as it was"
