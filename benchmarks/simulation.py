"""Scheduling benchmark without models: stand-in stage actors that hold a simulated GPU for a profile's time.

A simulated GPU is a lock per (fake) GPU id: an actor holds its GPU for a + rows x c (scaled) per batch, so
actors sharing a GPU take turns, as processes time-slicing one GPU do. The pipeline under test is the
product's own (planner, GPU reservation and pinning, chain of actor pools, Ray Data settings); only the stage
bodies differ. Throughput is measured from the first batch any stage starts to the last batch the last stage
finishes, so Ray and actor start-up are excluded and pipeline fill and drain are included.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from dataclasses import dataclass

import numpy as np

from actors.base import StageContext
from pipeline.progress import actor_location
from pipeline.counters import BEGIN_PREFIX, END_PREFIX, IMAGES_PREFIX, merge_stage_counters
from pipeline.stream import OutputStream


@dataclass(frozen=True)
class BatchTime:
    """Simulated seconds of one batch: overhead + rows x seconds per row."""

    overhead_s: float
    seconds_per_row: float

    def of(self, rows: int) -> float:
        return self.overhead_s + rows * self.seconds_per_row


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
    """Stands in for one stage actor; its StageContext.options carry the stage name and its BatchTime."""

    def __init__(self, context):
        self.name = context.options["name"]
        self.time: BatchTime = context.options["time"]
        self.lock_dir = context.options.get("lock_dir")
        where = actor_location()
        self.gpu = where["gpu_ids"][0] if where["gpu_ids"] else ""
        self.bundle = where["bundle"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["id"])
        began = time.time()
        _hold_gpu(self.lock_dir, self.time.of(rows))
        ended = time.time()
        out = {"id": batch["id"]}
        for key, value in batch.items():
            if key.startswith((BEGIN_PREFIX, END_PREFIX, IMAGES_PREFIX, "_gpu_", "_bundle_")):
                out[key] = value
        out[BEGIN_PREFIX + self.name] = np.full(rows, began)
        out[END_PREFIX + self.name] = np.full(rows, ended)
        out[IMAGES_PREFIX + self.name] = np.ones(rows, dtype=np.int64)
        # Where the batch ran, so the benchmark and the placement test can check the pinning.
        out["_gpu_" + self.name] = np.full(rows, self.gpu, dtype=object)
        out["_bundle_" + self.name] = np.full(rows, -1 if self.bundle is None else self.bundle, dtype=np.int64)
        return out


@dataclass
class Measurement:
    rows: int
    span_s: float
    throughput: float
    efficiency: float | None
    bound: float | None
    placement: dict = dataclasses.field(default_factory=dict)
    """Stage -> {bundle: sorted GPU ids seen running its batches there} (stand-in stages only)."""


def measure(dataset, first: str, last: str, bound: float | None) -> Measurement:
    """Rows, span and throughput of a stand-in run; efficiency against `bound` (None: zero-cost stages)."""
    totals: dict[str, float] = {}
    placement: dict[str, dict[int, set]] = {}
    rows = 0
    with OutputStream(dataset) as stream:
        for batch in stream:
            rows += len(batch["id"])
            merge_stage_counters(totals, {k: v for k, v in batch.items() if k.startswith((BEGIN_PREFIX, END_PREFIX))})
            for key in batch:
                if key.startswith("_bundle_"):
                    stage = key[len("_bundle_"):]
                    for bundle, gpu in zip(batch[key], batch["_gpu_" + stage]):
                        placement.setdefault(stage, {}).setdefault(int(bundle), set()).add(str(gpu))
    span = totals[END_PREFIX + last] - totals[BEGIN_PREFIX + first]
    throughput = rows / span
    return Measurement(rows=rows, span_s=round(span, 3), throughput=round(throughput, 4),
                       efficiency=round(throughput / bound, 4) if bound else None,
                       bound=round(bound, 4) if bound else None,
                       placement={s: {b: sorted(g) for b, g in sorted(by.items())} for s, by in placement.items()})


def source(rows: int, block_rows: int = 100):
    import ray.data

    return ray.data.range(rows, override_num_blocks=max(1, rows // block_rows)).map_batches(
        lambda batch: {"id": batch["id"]}, batch_format="numpy", num_cpus=0.1)


def run_pipeline(config, stages, plan, times: dict[str, BatchTime], rows: int, lock_dir: str, reservation=None,
                 block_rows: int = 100) -> Measurement:
    """The product's own chain of actor pools, pinned to the reservation's GPUs, with stand-in stage bodies."""
    from pipeline.run import chain_stages

    simulated = [dataclasses.replace(s, options={"name": s.name, "time": times[s.name], "lock_dir": lock_dir})
                 for s in stages]
    dataset = chain_stages(source(rows, block_rows), config, simulated, plan.placements,
                           actor_for=lambda spec: SimulatedStage, reservation=reservation)
    return measure(dataset, stages[0].name, stages[-1].name, _bound(plan.gpus, stages, plan, times))


def _bound(gpus: int, stages, plan, times: dict[str, BatchTime]) -> float | None:
    """G / the seconds per row every stage needs at its planned batch."""
    total = sum(times[s.name].of(plan.placements[s.name].batch_rows) / plan.placements[s.name].batch_rows
                for s in stages)
    return gpus / total if total else None


def run_ray_data_default(stages, plan, times: dict[str, BatchTime], rows: int, gpus: int, lock_dir: str) -> Measurement:
    """The same stages chained with Ray Data defaults: one whole-GPU actor per stage (Ray Data requires a
    batch size with GPUs: each stage's planned one), default blocks, no planning."""
    import ray.data

    dataset = ray.data.range(rows)
    for stage in stages:
        context = StageContext(config=None, options={"name": stage.name, "time": times[stage.name],
                                                     "lock_dir": lock_dir})
        dataset = dataset.map_batches(SimulatedStage, fn_constructor_kwargs={"context": context},
                                      batch_size=plan.placements[stage.name].batch_rows,
                                      compute=ray.data.ActorPoolStrategy(size=1), num_gpus=1)
    return measure(dataset, stages[0].name, stages[-1].name, _bound(gpus, stages, plan, times))


class AllStages:
    """Data-parallel stand-in: one actor per GPU runs every stage for its rows, each stage in micro-batches of
    its own planned size (the best a whole-model-per-GPU setup can do with the same batch costs)."""

    def __init__(self, stage_batches: list[tuple[BatchTime, int]], lock_dir: str):
        self.stage_batches, self.lock_dir = stage_batches, lock_dir

    def __call__(self, batch):
        rows = len(batch["id"])
        seconds = 0.0
        for time_of, batch_rows in self.stage_batches:
            full, rest = divmod(rows, batch_rows)
            seconds += full * time_of.of(batch_rows) + (time_of.of(rest) if rest else 0.0)
        began = time.time()
        _hold_gpu(self.lock_dir, seconds)
        return {"id": batch["id"], BEGIN_PREFIX + "all": np.full(rows, began), END_PREFIX + "all": np.full(rows, time.time())}


def run_data_parallel(stages, batch_rows: dict[str, int], times: dict[str, BatchTime], rows: int, gpus: int,
                      lock_dir: str, bound: float) -> Measurement:
    """Every GPU holds every model and runs each batch through all stages, each at its own batch rows."""
    import ray.data

    stage_batches = [(times[s.name], batch_rows[s.name]) for s in stages]
    block = max(b for _, b in stage_batches)  # one task carries a block through every stage, in micro-batches
    dataset = source(rows).repartition(target_num_rows_per_block=block).map_batches(
        AllStages, fn_constructor_args=(stage_batches, lock_dir), batch_size=block,
        compute=ray.data.ActorPoolStrategy(size=gpus, max_tasks_in_flight_per_actor=2), num_gpus=1, num_cpus=0.1)
    return measure(dataset, "all", "all", bound)
