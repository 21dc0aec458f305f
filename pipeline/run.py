"""One generation run: preflight, plan, the streaming Ray Data pipeline, and the summary written last."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata

import numpy as np

from pipeline import checkpoints, reader, storage
from pipeline.config import Config, redacted
from pipeline.output import SUCCESS_FILE, OutputDir
from pipeline.plan import Placement, StageSpec, plan_placements, stage_specs, task_cpus
from pipeline.writer import IMAGES_PREFIX, SECONDS_PREFIX, ShardWriter

log = logging.getLogger(__name__)

PACKAGES = ("ray", "torch", "diffusers", "transformers", "pyarrow", "fsspec", "s3fs", "unclip-ray")


class RunFailed(RuntimeError):
    """A run-level failure during execution (e.g. a model that does not load); one line for the user."""


def _stage_load_error(exc: BaseException) -> str | None:
    """The StageLoadError message inside a Ray/Ray Data exception chain, if that is what stopped the run.

    Ray hands the driver an ActorDiedError whose text carries the actor's creation-task traceback, not the
    original exception object, so the marker is found in the text.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for line in str(exc).splitlines():
            if "StageLoadError: " in line:
                return line.split("StageLoadError: ", 1)[1].strip()
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


@dataclass
class RunResult:
    summary: dict
    already_done: bool = False


def preflight(config: Config) -> reader.InputInfo:
    """Every run-level check that needs no GPU: model layouts, input files and columns. Raises one-line errors."""
    models = config.models
    for key in ("unclip", "upsampler_1024", "clip"):
        source = getattr(models, key)
        if source is not None:
            checkpoints.validate(source, key, config.storage_options, models.allow_pickle)
    return reader.preflight(config)


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (or the one this process already has), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True,
             logging_level=logging.WARNING)


def cluster_resources() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0))


def build_dataset(config: Config, info: reader.InputInfo, stages: list[StageSpec],
                  placements: dict[str, Placement], done_ids: set[str], io_cpus: float):
    """Read -> one actor pool per stage -> shard writer, as one streaming Ray Dataset."""
    import ray.data
    from actors.base import StageContext

    runtime_env = {"env_vars": storage.forwarded_env()}
    dataset = reader.read_prompts(config, info, done_ids=done_ids, num_cpus=io_cpus, runtime_env=runtime_env)
    for stage in stages:
        placement = placements[stage.name]
        # One stage batch per block: each task is one batch, so every replica gets work and stages overlap.
        dataset = dataset.repartition(target_num_rows_per_block=placement.batch_rows)
        context = StageContext(config=config, use_gpu=placement.num_gpus > 0, num_threads=placement.threads,
                               final_image=stage.final_image, options=stage.options)
        dataset = dataset.map_batches(
            stage.actor_class(), fn_constructor_kwargs={"context": context}, batch_size=placement.batch_rows,
            batch_format="numpy", zero_copy_batch=False,
            compute=ray.data.ActorPoolStrategy(size=placement.replicas),
            num_gpus=placement.num_gpus or None, num_cpus=placement.num_cpus, runtime_env=runtime_env,
        )
    return dataset.map_batches(ShardWriter(config), batch_size=config.output.shard_size, batch_format="numpy",
                               num_cpus=io_cpus, runtime_env=runtime_env)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def generate(config: Config, *, progress=None) -> RunResult:
    """Run the whole job; returns the summary that was written last under the output path."""
    started = time.time()
    info = preflight(config)
    output = OutputDir(config)
    state = output.prepare()
    if state.finished is not None:
        return RunResult(summary=state.finished, already_done=True)

    connect_ray()
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.execution_options.preserve_order = False
    cpus, gpus = cluster_resources()
    stages = stage_specs(config)
    placements = plan_placements(config, stages, cpus, gpus)
    dataset = build_dataset(config, info, stages, placements, state.done_ids, task_cpus(cpus))

    new_rows = new_images = 0
    stage_work: dict[str, float] = {}
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            new_rows += int(batch["rows"].sum())
            new_images += int(batch["images"].sum())
            for column, values in batch.items():
                if column.startswith((IMAGES_PREFIX, SECONDS_PREFIX)):
                    stage_work[column] = stage_work.get(column, 0) + float(np.asarray(values).sum())
            if progress is not None:
                progress(new_rows, info.rows - len(state.done_ids))
    except Exception as exc:
        message = _stage_load_error(exc)
        if message is None:
            raise
        raise RunFailed(f"{message.rstrip('.')}; fix the checkpoint and rerun (finished rows are kept)") from None

    table = output.metadata(columns=["id", "status", "image_key"])
    columns = table.to_pydict() if table is not None else {"id": [], "status": [], "image_key": []}
    row_status = dict(zip(columns["id"], columns["status"]))
    images = sum(1 for key in columns["image_key"] if key)
    if len(row_status) != info.rows:
        # Never declare success unless every input row is accounted for (a vanished or changed input file).
        raise RunFailed(f"only {len(row_status)} of {info.rows} input rows reached the output; the input changed "
                        "or could not be read during the run; rerun the same command to finish (finished rows are kept)")
    wall = time.time() - started
    summary = {
        "status": "complete",
        "output": config.output.path,
        "counts": {
            "input_rows": info.rows,
            "ok": sum(1 for s in row_status.values() if s == "ok"),
            "error": sum(1 for s in row_status.values() if s != "ok"),
            "skipped": len(state.done_ids),
            "images": images,
            "generated_this_attempt": new_rows,
        },
        "wall_time_s": round(wall, 3),
        "images_per_s": round(new_images / wall, 4) if wall > 0 else None,
        "stages": [{"name": s.name, "images_per_row": s.images_per_row, **vars(placements[s.name]),
                    "images": int(stage_work.get(IMAGES_PREFIX + s.name, 0)),
                    "busy_s": round(stage_work.get(SECONDS_PREFIX + s.name, 0.0), 3)} for s in stages],
        "cluster": {"cpus": cpus, "gpus": gpus},
        "models": {k: v for k, v in redacted(config)["models"].items()},
        "config": redacted(config),
        "versions": package_versions(),
    }
    output.write_json(SUCCESS_FILE, summary)
    return RunResult(summary=summary)
