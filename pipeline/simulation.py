"""Scheduling benchmark without models: stand-in stage actors that hold a simulated GPU for a profile's time.

A simulated GPU is a lock per (fake) GPU id: an actor holds its GPU for rows x GPU-seconds-per-row x scale
for each batch, so actors sharing a GPU take turns, as processes time-slicing one GPU do. The pipeline under
test is the product's own (planner, chain of actor pools, Ray Data settings); only the stage bodies differ.
Throughput is measured from the first batch any stage starts to the last batch the last stage finishes, so
Ray and actor start-up are excluded and pipeline fill and drain are included.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from dataclasses import dataclass

import numpy as np

from pipeline.writer import BEGIN_PREFIX, END_PREFIX, IMAGES_PREFIX, merge_stage_counters

LOCK_DIR_ENV = "UNCLIP_RAY_SIM_LOCKS"


def _hold_gpu(lock_dir: str | None, seconds: float) -> None:
    import ray

    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids or lock_dir is None:
        time.sleep(seconds)
        return
    with open(os.path.join(lock_dir, f"gpu-{gpu_ids[0]}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            time.sleep(seconds)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class SimulatedStage:
    """Stands in for one stage actor; its StageContext.options carry the stage name and GPU-seconds per row."""

    def __init__(self, context):
        self.name = context.options["name"]
        self.seconds_per_row = context.options["seconds_per_row"]
        self.lock_dir = context.options.get("lock_dir")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["id"])
        began = time.time()
        _hold_gpu(self.lock_dir, rows * self.seconds_per_row)
        ended = time.time()
        out = {"id": batch["id"]}
        for key, value in batch.items():
            if key.startswith((BEGIN_PREFIX, END_PREFIX, IMAGES_PREFIX)):
                out[key] = value
        out[BEGIN_PREFIX + self.name] = np.full(rows, began)
        out[END_PREFIX + self.name] = np.full(rows, ended)
        out[IMAGES_PREFIX + self.name] = np.ones(rows, dtype=np.int64)
        return out


@dataclass
class Measurement:
    rows: int
    span_s: float
    throughput: float
    efficiency: float | None
    bound: float | None


def measure(dataset, first: str, last: str, bound: float | None) -> Measurement:
    """Rows, span and throughput of a stand-in run; efficiency against `bound` (None: zero-cost stages)."""
    totals: dict[str, float] = {}
    rows = 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        rows += len(batch["id"])
        merge_stage_counters(totals, {k: v for k, v in batch.items() if k.startswith((BEGIN_PREFIX, END_PREFIX))})
    span = totals[END_PREFIX + last] - totals[BEGIN_PREFIX + first]
    throughput = rows / span
    return Measurement(rows=rows, span_s=round(span, 3), throughput=round(throughput, 4),
                       efficiency=round(throughput / bound, 4) if bound else None,
                       bound=round(bound, 4) if bound else None)


def source(rows: int, block_rows: int = 100):
    import ray.data

    return ray.data.range(rows, override_num_blocks=max(1, rows // block_rows)).map_batches(
        lambda batch: {"id": batch["id"]}, batch_format="numpy", num_cpus=0.1)


def run_pipeline(config, stages, plan, row_seconds: dict[str, float], rows: int, lock_dir: str,
                 block_rows: int = 100) -> Measurement:
    """The product's own chain of actor pools, with stand-in stage bodies."""
    from pipeline.run import chain_stages

    simulated = [dataclasses.replace(s, options={"name": s.name, "seconds_per_row": row_seconds[s.name],
                                                 "lock_dir": lock_dir}) for s in stages]
    dataset = chain_stages(source(rows, block_rows), config, simulated, plan.placements, actor_for=lambda spec: SimulatedStage)
    total = sum(row_seconds.values())
    return measure(dataset, stages[0].name, stages[-1].name, plan.gpus / total if total else None)


def run_ray_data_default(stages, row_seconds: dict[str, float], rows: int, gpus: int, batch_rows: int,
                         lock_dir: str) -> Measurement:
    """The same stages chained with Ray Data defaults: one whole-GPU actor per stage (Ray Data requires a
    batch size with GPUs: the same as the pipeline's), default blocks, no planning."""
    import ray.data

    from actors.base import StageContext

    dataset = ray.data.range(rows)
    for stage in stages:
        context = StageContext(config=None, options={"name": stage.name, "seconds_per_row": row_seconds[stage.name],
                                                     "lock_dir": lock_dir})
        dataset = dataset.map_batches(SimulatedStage, fn_constructor_kwargs={"context": context},
                                      batch_size=batch_rows, compute=ray.data.ActorPoolStrategy(size=1), num_gpus=1)
    return measure(dataset, stages[0].name, stages[-1].name, gpus / sum(row_seconds.values()))


class AllStages:
    """Data-parallel stand-in: one actor per GPU runs every stage for its rows."""

    def __init__(self, seconds_per_row: float, lock_dir: str):
        self.seconds_per_row, self.lock_dir = seconds_per_row, lock_dir

    def __call__(self, batch):
        rows = len(batch["id"])
        began = time.time()
        _hold_gpu(self.lock_dir, rows * self.seconds_per_row)
        return {"id": batch["id"], BEGIN_PREFIX + "all": np.full(rows, began), END_PREFIX + "all": np.full(rows, time.time())}


def run_data_parallel(row_seconds: dict[str, float], rows: int, gpus: int, batch_rows: int,
                      lock_dir: str) -> Measurement:
    import ray.data

    total = sum(row_seconds.values())
    dataset = source(rows).repartition(target_num_rows_per_block=batch_rows).map_batches(
        AllStages, fn_constructor_args=(total, lock_dir), batch_size=batch_rows,
        compute=ray.data.ActorPoolStrategy(size=gpus, max_tasks_in_flight_per_actor=2), num_gpus=1, num_cpus=0.1)
    return measure(dataset, "all", "all", gpus / total)
