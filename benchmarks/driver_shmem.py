"""How a Ray Data driver's RSS grows with the blocks it streams when it only consumes tiny outputs: a probe.

`python -m benchmarks.driver_shmem --blocks 4000 --block-kb 400` streams `--blocks` blocks of `--block-kb` KB
through two actor stages and a task that reduces each block to one row, iterated in this (the driver) process
with `Dataset.iter_batches`, and prints the driver's private (RssAnon) and object-store (RssShmem) pages as it
goes. `--output-stream` iterates with the product's `pipeline.stream.OutputStream` instead, which does not send
Ray Data's growing execution statistics to its stats actor every 5 seconds: the comparison that shows those
copies are what fill the driver with store pages. With `--tasks` Ray Data fuses the stages into one task.
`--all-block-stats` makes `OutputStream` keep every block's statistics, as Ray Data does by default. `--ray-core`
runs the two actor stages as plain actor calls without Ray Data (the first call's reference passed to the
second, the second's block fetched): what Ray itself keeps in the driver per task.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

from benchmarks.memory_run import rss_parts
from pipeline import stream


def rss_mb() -> tuple[float, float]:
    """(RssAnon, RssShmem) of this process in MB."""
    parts = rss_parts()
    return round(parts.get("RssAnon", 0) / 2**20, 1), round(parts.get("RssShmem", 0) / 2**20, 1)


def payload(batch, block_kb: float):
    """A stage whose output block is about `block_kb` KB, whatever its input."""
    rows = len(batch["id"])
    values = max(1, int(block_kb * 1024 / 8))
    return {"id": batch["id"], "payload": np.ones((rows, max(1, values // rows)), dtype=np.float64)}


class Payload:
    """`payload` as an actor stage."""

    def __init__(self, block_kb: float):
        self.block_kb = block_kb

    def __call__(self, batch):
        return payload(batch, self.block_kb)


def one_row(batch):
    return {"rows": np.array([len(batch["id"])])}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4000)
    parser.add_argument("--block-kb", type=float, default=60.0)
    parser.add_argument("--rows-per-block", type=int, default=100)
    parser.add_argument("--tasks", action="store_true", help="run the two stages as tasks instead of actor pools")
    parser.add_argument("--output-stream", action="store_true",
                        help="iterate with pipeline.stream.OutputStream instead of Dataset.iter_batches")
    parser.add_argument("--all-block-stats", action="store_true",
                        help="with --output-stream: keep every block's statistics (Ray Data's default)")
    parser.add_argument("--ray-core", action="store_true", help="the same chain as actor calls, without Ray Data")
    args = parser.parse_args()
    if args.all_block_stats:
        stream.BLOCK_STATS_KEPT = None  # an unbounded deque

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)

    def show(*row):  # as it goes: a long probe that is stopped early still says what it saw
        print("  ".join(f"{value!s:>16}" for value in row), flush=True)

    consumer = "ray.get" if args.ray_core else "OutputStream" if args.output_stream else "iter_batches"
    block_kind = f"{args.block_kb:g} KB through two {'task' if args.tasks else 'actor'} stages, read with {consumer}"
    print(f"{args.blocks} blocks of {block_kind}", flush=True)
    show("seconds", "rows", "driver anon MB", "driver shmem MB")
    began = time.time()
    show(0, 0, *rss_mb())
    if args.ray_core:
        return run_ray_core(ray, args, show, began)
    if args.tasks:
        fn, stage = payload, dict(fn_kwargs={"block_kb": args.block_kb})
    else:
        fn, stage = Payload, dict(fn_constructor_args=(args.block_kb,), compute=ray.data.ActorPoolStrategy(size=1))
    dataset = (ray.data.range(args.blocks * args.rows_per_block, override_num_blocks=args.blocks)
               .map_batches(fn, batch_size=args.rows_per_block, **stage)
               .map_batches(fn, batch_size=None, **stage)
               .map_batches(one_row, batch_size=None))
    rows = 0
    with (stream.OutputStream(dataset) if args.output_stream
          else contextlib.nullcontext(dataset.iter_batches(batch_size=None, batch_format="numpy"))) as batches:
        for i, batch in enumerate(batches):
            rows += int(batch["rows"].sum())
            if i % max(1, args.blocks // 5) == 0:
                show(round(time.time() - began), rows, *rss_mb())
    show(round(time.time() - began), rows, *rss_mb())


IN_FLIGHT = 16
"""--ray-core: blocks in flight at once."""


def run_ray_core(ray, args, show, began) -> None:
    """Each block through two actors as chained calls, at most `IN_FLIGHT` at a time; the driver owns every
    reference, as Ray Data's driver does."""
    first, second = (ray.remote(Payload).remote(args.block_kb) for _ in range(2))
    in_flight, rows = [], 0
    for i in range(args.blocks):
        ids = np.arange(i * args.rows_per_block, (i + 1) * args.rows_per_block)
        in_flight.append(second.__call__.remote(first.__call__.remote({"id": ids})))
        if len(in_flight) >= IN_FLIGHT:
            rows += len(ray.get(in_flight.pop(0))["id"])
        if i % max(1, args.blocks // 5) == 0:
            show(round(time.time() - began), rows, *rss_mb())
    rows += sum(len(batch["id"]) for batch in ray.get(in_flight))
    show(round(time.time() - began), rows, *rss_mb())


if __name__ == "__main__":
    main()
