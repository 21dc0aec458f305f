"""Session fixtures: a private model cache with the tiny checkpoints on disk, one Ray with fake GPUs, one shared
run, helpers.

Keeping `make test` fast on a 2-core machine (most of a Ray run's time is starting actor processes that import
torch, not the tiny models' compute):

- Join the session Ray (`ray_session`) rather than starting one; a subprocess driver joins it with
  ``RAY_ADDRESS=ray_session.get_runtime_context().gcs_address`` (it has no token auth).
- A test that only reads what a normal run wrote reads `shared_run` instead of running its own.
- A Ray run that is not about placement over several GPUs or stage actors adds `ONE_GPU` (one actor for
  every stage).
- Leave out stages a test does not need: ``model_overrides(models, upsampler_1024=False, clip=False)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Every Ray these tests start (the session's, and the clusters that test_faults, test_submit and test_cluster start
# in subprocesses, which inherit the environment) keeps its idle Python workers. By default a raylet keeps at
# most one per CPU (4 here) and ends the others after a second idle; with a run's stage actors holding workers,
# every later Ray Data task (read, row preparation, write) then started a fresh worker process that imports
# pyarrow, fsspec and the project again, up to 4 CPU-s each on a 2-core machine (four files of Ray runs: 66 s
# against 71-77 s; over the whole suite the gain is within the machine's noise). The product leaves Ray's default.
os.environ.setdefault("RAY_num_workers_soft_limit", "64")

# Fewer steps than the defaults keep CPU tests fast; guidance stays on so it is exercised.
FAST_STEPS = ["stages.prior.steps=4", "stages.decoder.steps=4", "stages.upsampler_256.steps=3",
              "stages.upsampler_1024.steps=3"]

ONE_GPU = ["run.gpus=1", "run.fuse_stages=true"]
"""For Ray runs on the session cluster whose test is not about placement over several GPUs or the actors of
each stage.

The session Ray has 2 fake GPUs, so a co-located plan starts one actor per stage on each: 2 x stages actor
processes, each importing torch and diffusers and loading its model. On a 2-core machine that start-up, not
the tiny models' compute, is most of a run's time. With one GPU planned and the stages fused, one actor runs
every stage, and the run still goes through the whole path (reservation, pinned bundle, streaming pool, writer).
Tests about placement, replicas or stage actors (test_run's CLI run, the exactness 'large' run, the textdiff
run, the killed actors) keep one actor per stage; the exactness 'small' run, fused, is compared with the
'large' one.
"""


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["UNCLIP_RAY_CACHE"] = str(cache)  # Ray workers inherit it from the driver that starts Ray
    return str(cache)


@pytest.fixture(scope="session")
def tiny_models(model_cache) -> dict[str, str]:
    """The tiny checkpoints saved in their real layouts; configs point at these plain directories."""
    from pipeline import checkpoints

    return {name: checkpoints.local_dir(f"tiny://{name}", name) for name in ("unclip", "upsampler_1024", "clip")}


@pytest.fixture(scope="session")
def ray_session(model_cache):
    """One local Ray for the whole session: 4 logical CPUs and 2 fake GPUs (placement is real, compute is CPU)."""
    import ray

    # Ray binds to this machine's own address (it resolves 127.0.0.1 to it); nothing leaves the machine.
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback (moto), for the whole session; tests create their own buckets."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


SHARED_PROMPTS = ["a red fox", "a blue bird", "a green frog"]
SHARED_SEEDS = [11, 2024, 7]
"""Fixed, not derived from the ids (which hash the session's temporary path). With these tiny random checkpoints
some seeds turn float-level batching differences into visible ones (e.g. 5383394934651723518 on 'a green frog':
33 dB at 64 px between one image per pass and batched passes, while the unbatched run equals the reference
exactly); these three stay above 77 dB, so the batching-invariance test fails only when batching is wrong."""
SHARED_SECRET = "hunter2"
SHARED_SETS = FAST_STEPS + [
    # Passes of several images, and blocks the two replicas of each stage split between them.
    "stages.prior.batch_size=4", "stages.decoder.batch_size=3", "stages.upsampler_256.batch_size=2",
    "stages.upsampler_1024.batch_size=2", "output.shard_size=2", f"storage_options.secret={SHARED_SECRET}",
    "output.save_embeddings=true"]


@dataclass(frozen=True)
class SharedRun:
    """What `shared_run` ran and what it printed; its outputs are under `output`."""

    prompts: str
    """The input Parquet file (a `prompt` column only: row ids are derived from the file name, `p-...`)."""
    output: Path
    sets: list[str]
    """The --set overrides it ran with (model paths included)."""
    code: int
    """`jobs.generate.main`'s exit status."""
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict:
        return json.loads((self.output / "_SUCCESS.json").read_text())


@pytest.fixture(scope="session")
def shared_run(tiny_models, ray_session, tmp_path_factory) -> SharedRun:
    """One complete run through the CLI entry point (`jobs.generate.main`) on the session Ray, made once and
    shared by every test that only reads its outputs. Treat them as read-only: copy the folder first to change it.

    Every stage (text encoder, prior, decoder, upsampler_256, upsampler_1024 to 256 px, CLIP scoring) on the
    session's 2 fake GPUs with the planner's co-located layout (an actor of each stage on each GPU), over the
    3 `SHARED_PROMPTS` (with `SHARED_SEEDS`) with `SHARED_SETS`: a `storage_options.secret` that must never be written, passes of
    several images, and shards of 2 rows (two metadata parts). Users: test_run (outputs, metadata, summary,
    placement, report), test_exactness (images equal diffusers' whatever the batching and replicas).
    """
    from jobs.generate import main

    folder = tmp_path_factory.mktemp("shared-run")
    prompts = write_prompts(folder / "p.parquet", SHARED_PROMPTS, seed=SHARED_SEEDS)
    output = folder / "out"
    sets = SHARED_SETS + model_overrides(tiny_models)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--input", prompts, "--output", str(output), *[a for s in sets for a in ("--set", s)]])
    return SharedRun(prompts=prompts, output=output, sets=sets, code=code, stdout=stdout.getvalue(),
                     stderr=stderr.getvalue())


def write_prompts(path, prompts, **columns) -> str:
    table = {"prompt": pa.array(list(prompts), type=columns.pop("prompt_type", pa.string()))}
    for name, values in columns.items():
        table[name] = values
    pq.write_table(pa.table(table), path)
    return str(path)


def model_overrides(models: dict[str, str], *, upsampler_1024: bool = True, clip: bool = True) -> list[str]:
    return [f"models.unclip={models['unclip']}",
            f"models.upsampler_1024={models['upsampler_1024'] if upsampler_1024 else 'null'}",
            f"models.clip={models['clip'] if clip else 'null'}"]


def run_in_process(config, prompts, seeds, stop_after: str | None = None):
    """Every stage actor in order on one batch, in this process: the pure path without Ray."""
    from benchmarks.local import prompt_batch, run_stages

    return run_stages(config, prompt_batch(prompts, seeds), stop_after=stop_after)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def within_tolerance(a: np.ndarray, b: np.ndarray) -> bool:
    """The exactness tolerance: PSNR >= 40 dB and >= 99% of uint8 pixels within 2 levels."""
    close = np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)) <= 2)
    return psnr(a, b) >= 40 and close >= 0.99
