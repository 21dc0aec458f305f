"""Which allocations a run's driver keeps through the streaming phase, native ones included: a probe (memray).

`python -m benchmarks.driver_allocations --input DIR --output DIR --capture FILE` runs the memory benchmark's
driver (`benchmarks.memory_run`: the product's `generate` with stand-in stage bodies, 4000 images per batch)
on a prompt directory that `--memory --memory-keep` left (or `memory_run.write_prompts` wrote), with
memray tracking every allocation of the driver process, C++ ones (Ray's core worker, Arrow) included, from the
moment the dataset is built to the start of the accounting scan. `--report FILE` then groups the allocations
still live at the end of the capture by where they were made. A capture cut short (the run stopped with
Ctrl-C or a kill) reports what was live when it stopped.

memray is not a dependency of the project: `pip install memray` first.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

CATEGORIES = (
    ("Ray core: specs of submitted tasks", ("TaskManager", "BuildCommonTaskSpec", "SubmitActorTask", "SubmitTask")),
    ("Ray core: reference counting", ("ReferenceCounter",)),
    ("gRPC", ("grpc", "rpc::")),
    ("Ray core: other", ("ray::", "raylet")),
    ("Python objects", ("obmalloc", "Py")),
)
"""The first category whose marker appears in an allocation's stack (native and Python frames) takes it."""


def capture(args) -> None:
    import memray

    from benchmarks import bench, memory_run
    from pipeline import run

    tracker = {}
    build_dataset, scan_metadata = run.build_dataset, run.scan_metadata

    def tracked_build(*a, **k):
        if "on" not in tracker:
            tracker["on"] = memray.Tracker(args.capture, native_traces=True)
            tracker["on"].__enter__()
        return build_dataset(*a, **k)

    def untracked_scan(*a, **k):
        if "on" in tracker:
            tracker.pop("on").__exit__(None, None, None)
        return scan_metadata(*a, **k)

    run.build_dataset, run.scan_metadata = tracked_build, untracked_scan
    # The memory benchmark's own settings, so a capture describes the run that benchmark measures.
    sets = bench._memory_sets(argparse.Namespace(memory_shard_size=args.shard_size, memory_batch=args.batch,
                                                 overrides=[]))
    figures = memory_run.run_child({"input": args.input, "output": args.output, "sets": sets, "cpus": args.cpus,
                                    "stage_queue_ratio": args.stage_queue_ratio})
    print(json.dumps({k: v for k, v in figures.items() if k != "timeline"}, indent=1))


def report(path: str, top: int) -> None:
    from memray import FileReader

    by_category, by_stack, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for record in FileReader(path).get_leaked_allocation_records(merge_threads=True):
        frames = record.hybrid_stack_trace(max_stacks=30)
        text = " | ".join(frame[0] for frame in frames)
        category = next((name for name, markers in CATEGORIES if any(m in text for m in markers)), "other")
        by_category[category] += record.size
        counts[category] += record.n_allocations
        by_stack[tuple(f"{f[0][:90]} ({f[1].rsplit('/', 1)[-1]}:{f[2]})" for f in frames[:8])] += record.size
    print(f"live at the end of the capture: {sum(by_category.values()) / 2**20:.1f} MB")
    for category, size in by_category.most_common():
        print(f"{size / 2**20:8.1f} MB {counts[category]:9d} allocations  {category}")
    print(f"\nthe {top} largest allocation sites:")
    for stack, size in by_stack.most_common(top):
        print(f"{size / 2**20:8.2f} MB")
        for line in stack:
            print(f"           {line}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.driver_allocations", description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="a directory of prompt Parquet files")
    parser.add_argument("--output", help="the run's output directory (must not hold another run)")
    parser.add_argument("--capture", help="memray capture file to write")
    parser.add_argument("--batch", type=int, default=4000, help="images per batch in every stage")
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--stage-queue-ratio", type=float, default=None,
                        help="as benchmarks.bench's: bound the queue between stages from the first block")
    parser.add_argument("--report", metavar="FILE", help="group a capture's live allocations instead of running")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    if args.report:
        report(args.report, args.top)
    elif args.input and args.output and args.capture:
        capture(args)
    else:
        parser.error("give --input, --output and --capture, or --report FILE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
