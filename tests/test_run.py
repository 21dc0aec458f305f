"""The main job end to end: outputs, metadata columns, the summary written last, and run-level errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.generate import main
from tests.conftest import FAST_STEPS, model_overrides, write_prompts

SPEC_COLUMNS = {"id", "prompt", "seed", "candidate", "rank", "clip_score", "candidate_scores", "image_key",
                "width", "height", "status", "error", "truncated"}


def cli(*args) -> list[str]:
    return [arg for pair in args for arg in pair]


def test_cli_run_writes_images_metadata_and_summary_last(tiny_models, ray_session, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.parquet", ["a red fox", "a blue bird", "a green frog"])
    output = tmp_path / "out"
    sets = [("--set", s) for s in FAST_STEPS + model_overrides(tiny_models) + ["storage_options.secret=hunter2"]]
    code = main(cli(("--input", prompts), ("--output", str(output)), *sets))
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 ok, 0 error" in printed and str(output) in printed

    table = pq.read_table(output / "metadata")
    assert SPEC_COLUMNS <= set(table.column_names)
    rows = table.to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    for row in rows:
        with Image.open(output / row["image_key"]) as image:
            assert image.size == (row["width"], row["height"]) == (256, 256)
        assert row["candidate"] == 0 and row["rank"] == 0 and row["candidate_scores"] == [pytest.approx(row["clip_score"])]
        assert row["id"].startswith("p-")  # derived from the file name and row position

    summary_path = output / "_SUCCESS.json"
    summary = json.loads(summary_path.read_text())
    last_part = max(os.path.getmtime(p) for p in (output / "metadata").iterdir())
    assert os.path.getmtime(summary_path) >= last_part
    assert summary["counts"]["ok"] == 3 and summary["counts"]["images"] == 3
    assert summary["versions"]["diffusers"] and summary["wall_time_s"] > 0 and summary["images_per_s"] > 0
    assert [s["name"] for s in summary["stages"]][:3] == ["text_encoder", "prior", "decoder"]
    everything = "".join(p.read_text(errors="ignore") for p in output.rglob("*.json"))
    assert "hunter2" not in everything


@pytest.mark.parametrize("case", ["missing_column", "missing_path", "bad_config", "missing_model", "unknown_key"])
def test_run_level_errors_are_one_line_and_nonzero_before_any_work(tiny_models, tmp_path, capsys, case):
    prompts = write_prompts(tmp_path / "p.parquet", ["a fox"])
    output = tmp_path / "out"
    args = {"--input": prompts, "--output": str(output)}
    sets = model_overrides(tiny_models)
    expected = {
        "missing_column": "has no column 'text'",
        "missing_path": "does not exist",
        "bad_config": "stages.decoder.steps must be an integer >= 1",
        "missing_model": "does not exist or is not a directory",
        "unknown_key": "did you mean 'stages.decoder.steps'",
    }[case]
    if case == "missing_column":
        sets.append("input.prompt_column=text")
    elif case == "missing_path":
        args["--input"] = str(tmp_path / "nope.parquet")
    elif case == "bad_config":
        sets.append("stages.decoder.steps=0")
    elif case == "missing_model":
        sets.append(f"models.unclip={tmp_path / 'no-such-karlo'}")
    else:
        sets.append("stages.decoder.stepz=3")
    code = main(cli(*args.items(), *[("--set", s) for s in sets]))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not output.exists(), "nothing is written before the run-level checks pass"


def test_module_entrypoint_exits_nonzero_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs.generate", "--preset", "tiny", "--input",
                             str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: input.path {tmp_path / 'missing.parquet'} does not exist (expected a Parquet file, "
                     "a directory of Parquet files, or a glob)"]
