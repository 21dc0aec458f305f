"""Live per-stage progress and Ray metrics: counters for the dashboard and Prometheus, a line per interval in logs."""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger(__name__)

BUNDLE_ENV = "UNCLIP_RAY_GPU_BUNDLE"
"""Set in each stage actor's environment by the GPU reservation: the placement-group bundle it is pinned to."""
BATCH_SECONDS_BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]


class ProgressBoard:
    """A tiny named actor holding rows done per stage; stage actors add to it, the driver reads it."""

    def __init__(self, shard_numbers=None):
        self.shard_numbers = shard_numbers
        """The attempt's pipeline.writer.ShardNumbers: every writer task of the run asks here."""
        self.rows: dict[str, int] = {}
        self.actors: list[dict] = []
        self.handles: list = []
        """Every stage actor of the run, so the driver can end them all when the run ends, however it ends."""
        self.placed: dict[str, int] = {}
        """Per stage, how many actors were placed and started (loading their model or done loading)."""

    def shard_number(self, rows_digest: str) -> int:
        return self.shard_numbers.number(rows_digest)

    def enlist(self, handle, stage: str) -> None:
        self.handles.append(handle)
        self.placed[stage] = self.placed.get(stage, 0) + 1

    def enlisted(self) -> list:
        return list(self.handles)

    def placed_counts(self) -> dict[str, int]:
        return dict(self.placed)

    def add(self, stage: str, rows: int) -> None:
        self.rows[stage] = self.rows.get(stage, 0) + rows

    def snapshot(self) -> dict[str, int]:
        return dict(self.rows)

    def started(self, where: dict) -> None:
        self.actors.append(where)

    def placement(self) -> list[dict]:
        return list(self.actors)


def actor_location() -> dict:
    """Where the calling actor runs: node, GPU ids, and the placement-group bundle it was pinned to."""
    import os

    import ray

    bundle = os.environ.get(BUNDLE_ENV)
    return {"node": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "bundle": int(bundle) if bundle not in (None, "", "-1") else None}


def enlist(board_name: str | None, stage: str) -> None:
    """Called by a stage actor as it starts: hand the run's board a handle to this actor (best effort)."""
    if not board_name:
        return
    try:
        import ray

        ray.get_actor(board_name).enlist.remote(ray.get_runtime_context().current_actor, stage)
    except Exception as exc:  # noqa: BLE001 - outside a run (tests, in-process use) there is no board
        log.debug("not enlisted on %s: %s", board_name, exc)


class StageReporter:
    """Used inside a stage actor: Ray metrics (tagged by stage) plus the progress board, both best effort."""

    def __init__(self, stage: str, board_name: str | None):
        self.stage = stage
        self.board = None
        self.metrics = None
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
            tags = ("stage",)
            self.metrics = {
                "rows": metrics.Counter("unclip_stage_rows", "rows a stage finished", tag_keys=tags),
                "images": metrics.Counter("unclip_stage_images", "images a stage computed", tag_keys=tags),
                "errors": metrics.Counter("unclip_stage_error_rows", "rows a stage marked as errors", tag_keys=tags),
                "seconds": metrics.Histogram("unclip_stage_batch_seconds", "compute seconds per batch",
                                             boundaries=BATCH_SECONDS_BOUNDARIES, tag_keys=tags),
            }
            if board_name:
                self.board = ray.get_actor(board_name)
                self.board.started.remote({"stage": stage, **actor_location()})
        except Exception as exc:  # noqa: BLE001 - reporting must never stop generation
            log.debug("progress reporting off for %s: %s", stage, exc)

    def record(self, rows: int, images: int, errors: int, seconds: float) -> None:
        try:
            if self.metrics is not None:
                tags = {"stage": self.stage}
                self.metrics["rows"].inc(rows, tags=tags)
                if images:
                    self.metrics["images"].inc(images, tags=tags)
                if errors:
                    self.metrics["errors"].inc(errors, tags=tags)
                self.metrics["seconds"].observe(seconds, tags=tags)
            if self.board is not None:
                self.board.add.remote(self.stage, rows)
        except Exception as exc:  # noqa: BLE001
            log.debug("progress report failed for %s: %s", self.stage, exc)


class ProgressPrinter:
    """Driver side: starts the board and, when stderr is not a terminal, logs one line per interval.

    On a terminal, Ray Data's own per-operator progress bars show the same thing.
    """

    def __init__(self, board_name: str, stages: list[str], total_rows: int, interval_s: float = 30.0,
                 stream=None, shard_numbers=None):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: the board (and the shard numbers it hands out) lives exactly as long as the run.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ray.remote(num_cpus=0)(ProgressBoard).options(
            name=board_name, scheduling_strategy=here).remote(shard_numbers)
        self.stages, self.total, self.interval = stages, total_rows, interval_s
        self.stream = stream or sys.stderr
        self.written = 0
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = None
        if not self.stream.isatty():
            self._thread = threading.Thread(target=self._loop, daemon=True, name="unclip-progress")
            self._thread.start()

    def line(self) -> str:
        import ray

        done = ray.get(self.board.snapshot.remote(), timeout=10)
        parts = [f"{stage} {done.get(stage, 0)}/{self.total}" for stage in self.stages]
        return (f"progress {time.time() - self.started:.0f}s: " + " | ".join(parts)
                + f" | written {self.written}/{self.total} rows")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                print(self.line(), file=self.stream, flush=True)
            except Exception as exc:  # noqa: BLE001 - a slow board must not stop the run
                log.debug("progress line failed: %s", exc)

    def placement(self) -> list[dict]:
        """Every stage actor that started: its stage, node, GPU ids and bundle (empty if the board is gone)."""
        import ray

        try:
            return ray.get(self.board.placement.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the report only; the run's outputs do not depend on it
            return []

    def placed_counts(self) -> dict[str, int] | None:
        """Per stage, the actors placed so far; None when the board cannot be asked."""
        import ray

        try:
            return ray.get(self.board.placed_counts.remote(), timeout=10)
        except Exception:  # noqa: BLE001
            return None

    def end_actors(self) -> None:
        """Kill every stage actor the run started. Ray Data's shutdown only drops its
        references to them, and after a failure something may still hold one: they would keep their CPUs and
        GPUs for as long as this process lives."""
        import ray

        try:
            handles = ray.get(self.board.enlisted.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001 - the board died with the node it ran on
            log.warning("could not list the run's stage actors to end them: %s", exc)
            return
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def close(self) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            ray.kill(self.board)
        except Exception:  # noqa: BLE001
            pass


class StartupWatch:
    """Driver side: every stage's actor pool starts all its actors at once, and a pool that cannot place some of
    them would run on the others (slower), or, with none placed, wait forever. After `wait_s` this compares the
    actors placed with the plan: fewer is a warning line; none for a stage fails the run, by interrupting the
    driver's main thread (`failure` then says why)."""

    def __init__(self, printer: ProgressPrinter, planned: dict[str, int], wait_s: float, stream=None):
        self.printer, self.planned, self.wait_s = printer, planned, wait_s
        self.stream = stream or sys.stderr
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._check, daemon=True, name="unclip-startup-watch")
        self._thread.start()

    def _check(self) -> None:
        if self._stop.wait(self.wait_s):
            return
        placed = self.printer.placed_counts()
        if placed is None:
            return
        short = {stage: placed.get(stage, 0) for stage, want in self.planned.items() if placed.get(stage, 0) < want}
        for stage, have in short.items():
            print(f"warning: stage {stage} has {have} of its {self.planned[stage]} planned actors after "
                  f"{self.wait_s:.0f} s; the cluster cannot place the others (free CPUs / GPUs / memory), so the "
                  "run is slower than planned", file=self.stream, flush=True)
        idle = [stage for stage, have in short.items() if have == 0]
        if idle and not self._stop.is_set():
            self.failure = (f"stage {idle[0]}: none of its {self.planned[idle[0]]} actors could be placed within "
                            f"{self.wait_s:.0f} s; free the cluster's resources the plan needs (or set "
                            f"stages.{idle[0]}.num_cpus / num_gpus lower) and rerun the same command")
            import _thread

            _thread.interrupt_main()

    def stop(self) -> None:
        self._stop.set()
