"""The `--memory` benchmark's parts: the product's own run (`pipeline.run.generate`) with zero-cost stage bodies.

Everything of a real run happens except the models: preflight (with the id-uniqueness pass), the output lease
and resume state, the Parquet reader and row preparer, the chain of actor pools, the shard writer (PNG encode,
webdataset tar, metadata part), the final accounting scan and the report. Only `StageSpec.actor_class` is
replaced, in the measured driver process only, by stand-ins that emit the columns the next stage and the
writer expect (a 4x4x3 uint8 image per kept candidate from the final stage).

Each measured run is its own driver process (`python -m benchmarks.memory_run --child SPEC.json`), as each
`jobs.generate` invocation is: a thread samples that process's RSS every 50 ms, and the product's phase
functions are wrapped so each sample is booked to the phase it fell in. The orchestration (inputs, the
half-finished output, the checks, the table) lives in benchmarks/bench.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import threading
import time

import numpy as np

from pipeline.counters import BEGIN_PREFIX, END_PREFIX, IMAGES_PREFIX, OOM_PREFIX, SECONDS_PREFIX

IMAGE_SIDE = 4
SETTLE_S = 5.0
ERROR_EVERY = 1000
"""Row i of the generated input has a whitespace-only prompt when i % ERROR_EVERY == ERROR_EVERY - 1, so the
error path (error rows, the report's reasons) runs too."""


# ---------------------------------------------------------------- stand-in stages


class StandInStage:
    """Zero-cost body of one stage: passes the row columns through and adds the stage counters the real
    actors add (images, busy seconds, begin/end, OOM halvings), so the summary's per-stage figures fill."""

    name = ""

    def __init__(self, context):
        from pipeline.progress import StageReporter, enlist

        enlist(context.progress_board, self.name)  # as the real actors do: the run's start-up watch counts them
        self.final_image = context.final_image
        self.keep = context.config.rerank.keep
        self.reporter = StageReporter(self.name, context.progress_board)

    def outputs(self, out: dict, ok: np.ndarray) -> int:
        """Add this stage's columns to `out`; returns images per ok row."""
        seeds = np.asarray(out["seeds"])
        per_row = seeds.shape[1]
        if self.final_image:
            image = np.zeros((len(ok), per_row, IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
            image[ok] = (seeds[ok] % 251).astype(np.uint8)[:, :, None, None, None]
            out["image"] = image
        return 1 if self.name == "text_encoder" else per_row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        began = time.time()
        status = np.asarray(batch["status"]).astype(object)
        ok = status == "ok"
        rows = len(status)
        out = dict(batch)
        per_row = self.outputs(out, ok)
        ended = time.time()
        images = np.where(ok, per_row, 0).astype(np.int64)
        out[IMAGES_PREFIX + self.name] = images
        out[SECONDS_PREFIX + self.name] = (ended - began) * images / max(1, int(images.sum()))
        out[BEGIN_PREFIX + self.name] = np.full(rows, began)
        out[END_PREFIX + self.name] = np.full(rows, ended)
        out[OOM_PREFIX + self.name] = np.zeros(rows, dtype=np.int64)
        self.reporter.record(rows=rows, images=int(images.sum()), errors=0, seconds=ended - began)
        return out


class TextEncoderStandIn(StandInStage):
    name = "text_encoder"


class PriorStandIn(StandInStage):
    name = "prior"


class DecoderStandIn(StandInStage):
    name = "decoder"


class Upsampler256StandIn(StandInStage):
    name = "upsampler_256"


class Upsampler1024StandIn(StandInStage):
    name = "upsampler_1024"


class RerankerStandIn(StandInStage):
    """Scores each candidate from its seed (deterministic, free) and keeps the best `rerank.keep`, reordering
    the candidate columns as the real reranker does."""

    name = "reranker"

    def outputs(self, out, ok):
        seeds = np.asarray(out["seeds"])
        scores = (seeds % 1000 / 40.0).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.keep]
        order[~ok] = np.arange(self.keep)
        for column in ("seeds", "image"):
            if column in out:
                values = np.asarray(out[column])
                out[column] = np.take_along_axis(values, order.reshape(order.shape + (1,) * (values.ndim - 2)), axis=1)
        out["candidate"] = order.astype(np.int32)
        out["candidate_scores"] = scores
        out["clip_score"] = np.take_along_axis(scores, order, axis=1)
        return seeds.shape[1]


STAND_INS = {cls.name: cls for cls in (TextEncoderStandIn, PriorStandIn, DecoderStandIn, Upsampler256StandIn,
                                       Upsampler1024StandIn, RerankerStandIn)}


@contextlib.contextmanager
def stand_in_stages():
    """`StageSpec.actor_class` returns the stand-ins, in this process only, for the duration."""
    from pipeline.plan import StageSpec

    original = StageSpec.actor_class
    StageSpec.actor_class = lambda spec: STAND_INS[spec.name]
    try:
        yield
    finally:
        StageSpec.actor_class = original


def set_stage_queue_ratio(ratio: float | None) -> None:
    """`--stage-queue-ratio`, in this process: make Ray Data's downstream-capacity backpressure apply from the
    first block, at `ratio` (a stage's queued output at most that many times, by bytes, the next stage's inputs
    in flight). By default Ray Data applies it only past half an operator's object-store budget, which small rows
    never reach. An experiment, not the product's setting: private Ray Data attribute (Ray is pinned)."""
    if not ratio:
        return
    import ray.data
    from ray.data._internal.execution.backpressure_policy import downstream_capacity_backpressure_policy as policy

    ray.data.DataContext.get_current().downstream_capacity_backpressure_ratio = ratio
    policy.DownstreamCapacityBackpressurePolicy.OBJECT_STORE_BUDGET_UTIL_THRESHOLD = 0.0


# ---------------------------------------------------------------- inputs


def prompt_text(i: int) -> str:
    return "   " if i % ERROR_EVERY == ERROR_EVERY - 1 else f"a watercolor painting of object number {i} on a table"


def write_prompts(directory: str, rows: int, with_ids: bool, file_rows: int = 1_000_000,
                  chunk_rows: int = 100_000) -> dict:
    """A directory of Parquet files of `rows` prompts (and unique string ids), streamed chunk by chunk;
    returns its manifest (also written as _manifest.json, which the reader skips as hidden)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    fields = [("prompt", pa.string())] + ([("id", pa.string())] if with_ids else [])
    schema = pa.schema(fields)
    files = 0
    for start in range(0, rows, file_rows):
        stop = min(rows, start + file_rows)
        with pq.ParquetWriter(os.path.join(directory, f"prompts-{files:04d}.parquet"), schema) as writer:
            for chunk in range(start, stop, chunk_rows):
                index = range(chunk, min(stop, chunk + chunk_rows))
                columns = {"prompt": pa.array([prompt_text(i) for i in index], pa.string())}
                if with_ids:
                    columns["id"] = pa.array([f"img-{i:09d}" for i in index], pa.string())
                writer.write_table(pa.table(columns, schema=schema))
        files += 1
    errors = sum(1 for i in range(ERROR_EVERY - 1, rows, ERROR_EVERY))
    manifest = {"rows": rows, "with_ids": with_ids, "files": files, "error_rows": errors}
    with open(os.path.join(directory, "_manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh)
    return manifest


# ---------------------------------------------------------------- RSS by phase


FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
"""RSS and its parts (Linux): private memory, mapped files (libraries), shared memory (Ray's object store)."""


def rss_parts(process=None) -> dict[str, int]:
    """This process's RSS in bytes, and on Linux its anonymous, file and shared-memory parts."""
    try:
        parts = {}
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in FIELDS:
                    parts[key] = int(value.split()[0]) * 1024
        if len(parts) == len(FIELDS):
            return parts
    except OSError:
        pass
    import psutil

    return {"VmRSS": (process or psutil.Process()).memory_info().rss}


class PhaseSampler:
    """Samples this process's RSS every `interval_s` in a thread; each sample counts for the phase current
    when it was taken (and for the whole run). With `traced`, also the tracemalloc peak of each phase."""

    def __init__(self, interval_s: float = 0.05, traced: bool = False, timeline_s: float = 10.0):
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.timeline_s = timeline_s
        self.timeline: list[list] = []
        """Every timeline_s: [seconds, rows written so far, RSS MB, anon MB, shmem MB]."""
        self.rows_written = 0
        self._started = time.time()
        self.traced = traced
        self.phase = "start"
        self.phases: dict[str, dict] = {}
        self.before = self.peak = rss_parts(self.process)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    @staticmethod
    def _max(peak: dict, parts: dict) -> dict:
        """Peaks of each part (taken separately: they need not peak together)."""
        return {k: max(v, peak.get(k, 0)) for k, v in parts.items()}

    def _sample(self) -> dict:
        parts = rss_parts(self.process)
        with self._lock:
            self.peak = self._max(self.peak, parts)
            entry = self.phases.get(self.phase)
            if entry is not None:
                entry["peak"] = self._max(entry["peak"], parts)
        return parts

    def _loop(self) -> None:
        next_point = 0.0
        while not self._done.wait(self.interval_s):
            parts = self._sample()
            elapsed = time.time() - self._started
            if elapsed >= next_point:
                next_point = elapsed + self.timeline_s
                self.timeline.append([round(elapsed, 1), self.rows_written, *(round(parts.get(k, 0) / 2**20, 1)
                                      for k in ("VmRSS", "RssAnon", "RssShmem"))])

    def progress(self, rows_written: int, todo: int) -> None:
        """generate's progress callback: rows written so far, for the timeline."""
        self.rows_written = rows_written

    def enter(self, phase: str) -> None:
        """From now on samples count for `phase` (a phase entered again keeps its first start and adds time)."""
        import tracemalloc

        parts = self._sample()
        now = time.time()
        with self._lock:
            current = self.phases.get(self.phase)
            if current is not None:
                current["seconds"] += now - current.pop("_since")
                if self.traced:
                    current["traced_peak"] = max(current.get("traced_peak", 0), tracemalloc.get_traced_memory()[1])
            if self.traced:
                tracemalloc.reset_peak()
            entry = self.phases.setdefault(phase, {"start": parts, "peak": dict(parts), "seconds": 0.0})
            entry["_since"] = now
            self.phase = phase

    def start(self) -> None:
        import tracemalloc

        if self.traced:
            tracemalloc.start()
        self.before = self.peak = rss_parts(self.process)
        self._started = time.time()
        self._thread.start()

    def stop(self) -> None:
        self.enter("end")
        self._done.set()
        self._thread.join()
        self.phases.pop("end", None)

    def figures(self) -> dict:
        def mb(value: int) -> float:
            return round(value / 2**20, 1)

        names = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
        phases = {}
        for name, entry in self.phases.items():
            phases[name] = {"rss_start_mb": mb(entry["start"]["VmRSS"]), "peak_mb": mb(entry["peak"]["VmRSS"]),
                            "seconds": round(entry["seconds"], 1),
                            **{f"peak_{names[k]}_mb": mb(v) for k, v in entry["peak"].items() if k in names}}
            if "traced_peak" in entry:
                phases[name]["python_heap_peak_mb"] = mb(entry["traced_peak"])
        return {"driver_rss_before_mb": mb(self.before["VmRSS"]), "driver_rss_peak_mb": mb(self.peak["VmRSS"]),
                **{f"before_{names[k]}_mb": mb(v) for k, v in self.before.items() if k in names},
                **{f"peak_{names[k]}_mb": mb(v) for k, v in self.peak.items() if k in names},
                "phases": phases, "timeline": self.timeline}


@contextlib.contextmanager
def phases_of_generate(sampler: PhaseSampler):
    """Wrap the product's phase functions (as `generate` looks them up) so the sampler knows the phase:
    preflight, setup (output check, lease, plan), prepare (resume state), streaming (dataset built and
    drained, committed parts listed), accounting (scan_metadata), report (write_report), summary."""
    from pipeline import run
    from pipeline.output import OutputDir

    def wrap(fn, phase: str, after: str):
        def wrapped(*args, **kwargs):
            sampler.enter(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                sampler.enter(after)
        return wrapped

    saved = {name: getattr(run, name) for name in ("preflight", "committed_ids", "build_dataset", "scan_metadata",
                                                     "write_report")}
    prepare = OutputDir.prepare
    run.preflight = wrap(saved["preflight"], "preflight", "setup")
    OutputDir.prepare = wrap(prepare, "prepare", "setup")
    run.committed_ids = wrap(saved["committed_ids"], "prepare", "setup")

    def build_dataset(*args, **kwargs):
        sampler.enter("streaming")  # from here to the accounting scan: the dataset streams to its end
        return saved["build_dataset"](*args, **kwargs)

    run.build_dataset = build_dataset
    run.scan_metadata = wrap(saved["scan_metadata"], "accounting", "summary")
    run.write_report = wrap(saved["write_report"], "report", "summary")
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(run, name, fn)
        OutputDir.prepare = prepare


# ---------------------------------------------------------------- one measured driver


def run_child(spec: dict) -> dict:
    """One measured `generate` in this process: spec has input, output, sets, cpus, traced, stage_queue_ratio."""
    import ray

    from pipeline import run
    from pipeline.config import load_config

    config = load_config(None, spec["sets"], input_path=spec["input"], output_path=spec["output"], preset="tiny")
    set_stage_queue_ratio(spec.get("stage_queue_ratio"))
    ray.init(num_cpus=spec["cpus"], num_gpus=0, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        import pipeline.report  # noqa: F401 - what generate imports on its way is not the data path
        import ray.data  # noqa: F401

        time.sleep(SETTLE_S)  # Ray's driver threads start their own buffers just after init
        gc.collect()
        sampler = PhaseSampler(traced=spec.get("traced", False))
        started = time.time()
        with stand_in_stages(), phases_of_generate(sampler):
            sampler.start()
            try:
                result = run.generate(config, progress=sampler.progress)
            finally:
                sampler.stop()
        seconds = time.time() - started
    finally:
        ray.shutdown()
    summary = result.summary
    return {**sampler.figures(), "seconds": round(seconds, 1), "already_done": result.already_done,
            "counts": summary["counts"], "status": summary["status"], "wall_time_s": summary["wall_time_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_run")
    parser.add_argument("--child", required=True, help="spec JSON file; the figures go to its 'result' path")
    args = parser.parse_args(argv)
    with open(args.child, encoding="utf-8") as fh:
        spec = json.load(fh)
    figures = run_child(spec)
    with open(spec["result"], "w", encoding="utf-8") as fh:
        json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
