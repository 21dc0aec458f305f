"""The main job end to end: outputs, metadata columns, the summary written last, and run-level errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.generate import main
from pipeline.config import load_config
from tests.conftest import FAST_STEPS, ONE_GPU, SHARED_SECRET, model_overrides, run_in_process, write_prompts

METADATA_COLUMNS = {"id", "prompt", "seed", "candidate", "rank", "clip_score", "candidate_scores", "image_key",
                "width", "height", "status", "error", "truncated"}


def cli(*args) -> list[str]:
    return [arg for pair in args for arg in pair]


def test_cli_run_writes_images_metadata_and_summary_last(shared_run):
    # The session's shared run: `python -m jobs.generate` with every stage on the session's 2 fake GPUs.
    output = shared_run.output
    assert shared_run.code == 0, shared_run.stderr[-3000:]
    printed = shared_run.stdout
    assert "3 ok, 0 error" in printed and str(output) in printed

    table = pq.read_table(output / "metadata")
    assert METADATA_COLUMNS <= set(table.column_names)
    rows = table.to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    for row in rows:
        with Image.open(output / row["image_key"]) as image:
            assert image.size == (row["width"], row["height"]) == (256, 256)
        assert row["candidate"] == 0 and row["rank"] == 0 and row["candidate_scores"] == [pytest.approx(row["clip_score"])]
        assert row["id"].startswith("p-")  # derived from the file name and row position
    # output.save_embeddings: each image's embedding is the prior's sample for its prompt and seed.
    config = load_config(None, shared_run.sets, input_path=shared_run.prompts, output_path="unused")
    sampled = run_in_process(config, [r["prompt"] for r in rows], [[r["seed"]] for r in rows], stop_after="prior")
    for row, expected in zip(rows, sampled["image_embeds"][:, 0]):
        np.testing.assert_allclose(row["image_embedding"], expected, rtol=1e-3, atol=1e-4)

    summary_path = output / "_SUCCESS.json"
    summary = json.loads(summary_path.read_text())
    last_part = max(os.path.getmtime(p) for p in (output / "metadata").iterdir())
    assert os.path.getmtime(summary_path) >= last_part
    assert summary["counts"]["ok"] == 3 and summary["counts"]["images"] == 3
    # The recorded versions are the installed ones ("not installed" would be truthy, so compare exactly).
    assert summary["versions"]["diffusers"] == importlib.metadata.version("diffusers")
    assert summary["versions"]["torch"] == importlib.metadata.version("torch")
    assert summary["wall_time_s"] > 0 and summary["images_per_s"] > 0
    assert [s["name"] for s in summary["stages"]][:3] == ["text_encoder", "prior", "decoder"]
    # Every stage actor ran on the GPU bundle the plan gave it (the session Ray has 2 fake GPUs).
    assert summary["plan"]["layout"] == "co-located" and summary["plan"]["gpus"] == 2
    planned = {s["name"]: s["bundles"] for s in summary["stages"]}
    assert all(bundles == [0, 1] for bundles in planned.values()), planned
    seen = {name: sorted(a["bundle"] for a in summary["actors"] if a["stage"] == name) for name in planned}
    assert seen == planned
    gpu_of_bundle = {}
    for actor in summary["actors"]:
        gpu_of_bundle.setdefault(actor["bundle"], set()).add(tuple(actor["gpu_ids"]))
    assert all(len(ids) == 1 and len(next(iter(ids))) == 1 for ids in gpu_of_bundle.values()), gpu_of_bundle
    assert len({next(iter(ids)) for ids in gpu_of_bundle.values()}) == 2, "the two bundles are two GPUs"
    everything = "".join(p.read_text(errors="ignore") for p in output.rglob("*.json"))
    assert SHARED_SECRET not in everything

    report = json.loads((output / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == [s["name"] for s in summary["stages"]]
    assert all(s["images"] == 3 and s["images_per_s"] > 0 for s in report["stages"])
    assert report["clip_score"]["count"] == 3 and report["errors"]["rows"] == 0
    assert report["contact_sheet_images"] == 3
    with Image.open(output / "contact_sheet.png") as sheet:
        assert sheet.width >= 3 * 128 and sheet.height >= 128


def test_window_names_the_run_and_a_finished_window_is_a_no_op(tiny_models, ray_session, tmp_path, capsys):
    from pipeline.config import load_config
    from pipeline.run import RunInterrupted, generate

    (tmp_path / "in" / "2026-11-24").mkdir(parents=True)
    write_prompts(tmp_path / "in" / "2026-11-24" / "p.parquet",
                  ["a red fox", "a blue bird", "a green frog", "a grey owl", "a pink pig"])
    sets = [("--set", s) for s in FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False)
            + ONE_GPU + ["output.shard_size=1"]]
    args = cli(("--input", str(tmp_path / "in" / "{window}")), ("--output", str(tmp_path / "out" / "{window}")),
               ("--window", "2026-11-24"), *sets)
    output = tmp_path / "out" / "2026-11-24"

    # Ctrl-C on the way stops the run with the count of what is committed; the same command then resumes, says
    # so at the start, and counts this attempt's images apart.
    def interrupt(done, todo):
        raise KeyboardInterrupt

    config = load_config(None, [s for _, s in sets], input_path=str(tmp_path / "in" / "{window}"),
                         output_path=str(tmp_path / "out" / "{window}"), window="2026-11-24")
    with pytest.raises(RunInterrupted) as stopped:
        generate(config, progress=interrupt)
    committed = stopped.value.committed
    assert str(stopped.value) == f"interrupted; rerun the same command to resume ({committed} rows committed)"
    assert committed == pq.read_table(output / "metadata").num_rows >= 1
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr()
    assert f"resuming: {committed} of 5 rows already committed" in printed.err
    assert f"{5 - committed} images made this attempt" in printed.out and "5 in the output" in printed.out
    summary = json.loads((output / "_SUCCESS.json").read_text())
    assert summary["counts"]["skipped"] == committed and summary["counts"]["generated_this_attempt"] == 5 - committed
    assert summary["counts"]["images_this_attempt"] == 5 - committed and summary["counts"]["images"] == 5
    assert pq.read_table(output / "metadata").num_rows == 5 and summary["counts"]["input_rows"] == 5

    files = {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()}
    assert main(args) == 0  # finished: says so, touches nothing
    assert "window 2026-11-24 already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()} == files
    # (A finished window whose input gained rows is unfinished again: test_output.)

    # Rows that left the input are not silently kept as part of a "complete" run.
    write_prompts(tmp_path / "in" / "2026-11-24" / "p.parquet", ["a red fox", "a blue bird", "a green frog"])
    capsys.readouterr()
    assert main(args) == 2
    assert "2 row(s) generated earlier are no longer in the input" in capsys.readouterr().err

    assert main(cli(("--input", str(tmp_path / "in" / "{window}")), ("--output", str(tmp_path / "o")), *sets)) == 2
    assert "pass --window" in capsys.readouterr().err


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


def test_output_problems_are_one_line_before_any_model_loads(tiny_models, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.parquet", ["a fox"])
    (tmp_path / "a-file").write_text("x")
    sets = [("--set", s) for s in model_overrides(tiny_models)]
    assert main(cli(("--input", prompts), ("--output", str(tmp_path / "a-file")), *sets)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output ") and "is a file; output.path must be a directory" in err and "\n" not in err
    assert main(cli(("--input", prompts), ("--output", str(tmp_path / "a-file" / "below")), *sets)) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be written: " in err and "a file is in the way" in err and "\n" not in err


def test_ctrl_c_is_one_line_and_exit_130(tiny_models, tmp_path, capsys, monkeypatch):
    import pipeline.run
    from pipeline.run import RunInterrupted

    def interrupted(config, **kwargs):
        raise RunInterrupted(7)

    monkeypatch.setattr(pipeline.run, "generate", interrupted)
    prompts = write_prompts(tmp_path / "p.parquet", ["a fox"])
    sets = [("--set", s) for s in model_overrides(tiny_models)]
    assert main(cli(("--input", prompts), ("--output", str(tmp_path / "out")), *sets)) == 130
    assert capsys.readouterr().err.strip() == "interrupted; rerun the same command to resume (7 rows committed)"


def test_module_entrypoint_exits_nonzero_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs.generate", "--preset", "tiny", "--input",
                             str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: input.path {tmp_path / 'missing.parquet'} does not exist (expected a Parquet file, "
                     "a directory of Parquet files, or a glob)"]


def test_a_noise_level_above_the_checkpoints_maximum_is_refused_before_any_work(tiny_models, tmp_path, capsys):
    from pipeline.checkpoints import CheckpointError
    from pipeline.config import load_config
    from pipeline.run import preflight

    prompts = write_prompts(tmp_path / "p.parquet", ["a fox"])
    output = tmp_path / "out"
    sets = model_overrides(tiny_models) + ["stages.upsampler_1024.noise_level=351"]
    with pytest.raises(CheckpointError):  # preflight itself refuses, before Ray starts or any model loads
        preflight(load_config(None, sets, input_path=prompts, output_path=str(output)))
    preflight(load_config(None, sets[:-1] + ["stages.upsampler_1024.noise_level=350"], input_path=prompts,
                          output_path=str(output)))
    code = main(cli(("--input", prompts), ("--output", str(output)), *[("--set", s) for s in sets]))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"error: stages.upsampler_1024.noise_level=351 is above the maximum 350 of checkpoint "
                   f"{tiny_models['upsampler_1024']} (max_noise_level in its model_index.json); set "
                   "stages.upsampler_1024.noise_level to at most 350")
    assert not output.exists(), "nothing is written before the run-level checks pass"


def finishes_within(seconds: float, fn):
    """fn's result (or its exception) if it returns within `seconds`; a test failure instead of a hang."""
    import threading

    outcome = {}

    def call():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the run did not finish within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def wait_for_idle_cluster(ray, seconds: float) -> dict:
    """The cluster's free CPUs and GPUs once they are all free again, or as they are after `seconds`."""
    import time

    total = ray.cluster_resources()
    deadline = time.monotonic() + seconds
    while True:
        free = {k: ray.available_resources().get(k, 0.0) for k in ("CPU", "GPU")}
        if all(free[k] >= total.get(k, 0.0) - 1e-6 for k in free) or time.monotonic() > deadline:
            return {k: (free[k], total.get(k, 0.0)) for k in free}
        time.sleep(0.5)


@pytest.mark.slow
def test_a_model_that_fails_to_load_stops_the_run_with_one_line_and_frees_the_cluster_for_the_next_run(
        tiny_models, ray_session, tmp_path, capsys):
    import re
    import shutil

    from pipeline.run import generate

    broken = tmp_path / "clip"
    shutil.copytree(tiny_models["clip"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")  # passes preflight, fails to load
    prompts = write_prompts(tmp_path / "p.parquet", ["a red fox", "a blue bird"])
    # A short GPU wait: GPUs a failed run still held make the next run fail instead of waiting 15 minutes.
    sets = FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False) + ["run.gpu_wait_s=60"]
    good = ONE_GPU  # the good run only needs to start; one actor per stage keeps it short

    before = wait_for_idle_cluster(ray_session, 30)  # what earlier tests' runs still hold is not this run's
    # The failed run as a user starts it (the CLI's entry function, in this process). CPU actors only: no
    # placement group whose removal would end them; only the run's own shutdown does.
    capsys.readouterr()
    failed = cli(("--input", prompts), ("--output", str(tmp_path / "failed")),
                 *[("--set", s) for s in sets + [f"models.clip={broken}", "run.gpus=0"]])
    assert finishes_within(400, lambda: main(failed)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err[-3000:]
    # It names the checkpoint as given (the safetensors error alone names no file).
    assert re.fullmatch(r"error: stage reranker could not load its model: model of models\.clip=" + re.escape(str(broken))
                        + r": .+; fix the checkpoint and rerun \(finished rows are kept\)", errors[0]), errors[0]
    free = wait_for_idle_cluster(ray_session, 120)  # actor processes end asynchronously; slow on a busy machine
    assert all(free[k][0] >= before[k][0] - 1e-6 for k in free), f"still held after the failed run: {free} " \
                                                                  f"(free before it: {before})"
    summary = finishes_within(400, lambda: generate(load_config(None, sets + good, input_path=prompts,
                                                                output_path=str(tmp_path / "good")))).summary
    assert summary["status"] == "complete" and summary["counts"]["ok"] == 2


def test_library_noise_is_off_unless_verbose(ray_session):
    import logging

    import ray.data

    from pipeline.config import load_config
    from pipeline.run import configure_data_context, stage_env

    quiet = load_config(None, ["models.unclip=/x"], input_path="in", output_path="out")
    loud = load_config(None, ["models.unclip=/x", "run.verbose=true"], input_path="in", output_path="out")
    assert stage_env(quiet)["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # no weights-loading bar per actor
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in stage_env(loud)
    context = ray.data.DataContext.get_current()
    saved = (context.print_on_execution_start, logging.getLogger("ray.data").level)
    try:
        configure_data_context(verbose=False)
        assert context.print_on_execution_start is False
        assert not logging.getLogger("ray.data").isEnabledFor(logging.INFO)
        assert logging.getLogger("ray.data").isEnabledFor(logging.WARNING), "real warnings still show"
    finally:
        context.print_on_execution_start = saved[0]
        logging.getLogger("ray.data").setLevel(saved[1])


def test_a_resume_keeps_its_committed_ids_in_the_object_store_not_in_the_driver(ray_session, tmp_path):
    """At 10M rows the committed-id set is 160 MB: the driver gets its size and a reference for the readers."""
    from pipeline.run import committed_ids
    from tests.test_output import attempt, config, prepare, rows_of

    cfg = config(tmp_path / "out")
    assert committed_ids(cfg, prepare(cfg).committed_parts) == (0, None)
    with attempt(cfg) as (_, _, write):
        write(rows_of(["a", "b", "bad"]))
        write(rows_of(["c", "bad2"]))
    count, ids = committed_ids(cfg, prepare(cfg).committed_parts)
    assert count == 5 and isinstance(ids, ray_session.ObjectRef)
    assert ray_session.get(ids).contains(["a", "bad2", "d"]).tolist() == [True, True, False]
    unreadable = tmp_path / "out" / "metadata" / "garbage.parquet"
    unreadable.write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowInvalid) as failure:  # the reading error itself, as in the driver, not Ray's wrapper
        committed_ids(cfg, [str(unreadable)])
    assert not isinstance(failure.value, ray_session.exceptions.RayTaskError)
