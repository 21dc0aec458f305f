"""One generation run: preflight, plan, the streaming Ray Data pipeline, and the summary written last."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import metadata as importlib_metadata

from actors.base import StageContext
from actors.fused import FusedStages
from pipeline import checkpoints, cluster, costs, reader, storage
from pipeline.config import Config, compute_dtype, redacted
from pipeline.lease import LeaseError
from pipeline.output import SUCCESS_FILE, OutputDir, same_input
from pipeline.plan import (ClusterShape, Plan, Placement, StageSpec, bundle_cpus, fused_placement, plan_placements,
                           stage_specs, task_cpus)
from pipeline.reservation import GpuReservation, ReservationTimeout
from pipeline.progress import ProgressPrinter, StartupWatch
from pipeline.report import REPORT_FILE, scan_metadata, write_report
from pipeline.counters import (BEGIN_PREFIX, END_PREFIX, IMAGES_PREFIX, OOM_PREFIX, SECONDS_PREFIX,
                               merge_stage_counters)
from pipeline.stream import OutputStream
from pipeline.writer import ShardWriter

log = logging.getLogger(__name__)

TASKS_IN_FLIGHT_PER_ACTOR = 2
"""One batch running, one queued: actors never wait on the scheduler, and none hoards the last batches."""
MIN_ACTORS_WAIT_S = 900
"""How long every planned stage actor has to be placed before the run warns (or, with none of a stage's, fails)."""
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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during the stream, after the streaming execution was shut down; `committed` rows are safe."""

    def __init__(self, committed: int):
        super().__init__(f"interrupted; rerun the same command to resume ({committed} rows committed)")
        self.committed = committed


@dataclass
class RunResult:
    summary: dict
    already_done: bool = False


def pin_model_revisions(config: Config) -> Config:
    """The config with every Hugging Face Hub source pinned to the commit its revision names now."""
    models = config.models
    pinned = {key: checkpoints.pin_revision(getattr(models, key), layout, models.allow_pickle)
              for key, layout in config.model_layouts().items()}
    return dataclasses.replace(config, models=dataclasses.replace(models, **pinned))


def preflight(config: Config) -> reader.InputInfo:
    """Every run-level check that needs no GPU: model layouts, input files and columns. Raises one-line errors."""
    models = config.models
    for key, layout in config.model_layouts().items():
        checkpoints.validate(getattr(models, key), layout, config.storage_options, models.allow_pickle)
    if models.upsampler_1024 is not None:
        checkpoints.check_noise_level(models.upsampler_1024, config.stages.upsampler_1024.noise_level,
                                      config.storage_options)
    return reader.preflight(config)


RAY_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
_CONNECTED_HERE = []
"""Set when connect_ray started this process's Ray connection (not a caller's, e.g. a notebook's)."""


def connect_ray(verbose: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS (or the one this process already has), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        # Ray turns token authentication on by default and warns each time that it did: news, not a problem.
        logging.getLogger(RAY_AUTH_SETUP_LOGGER).setLevel(logging.ERROR)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True, logging_level=logging.WARNING)
    _CONNECTED_HERE.append(True)


def disconnect_ray() -> None:
    """Drop the Ray connection connect_ray made (a caller's own connection is left alone)."""
    import ray

    if _CONNECTED_HERE and ray.is_initialized():
        ray.shutdown()
        _CONNECTED_HERE.clear()


def planned_cluster(config: Config) -> ClusterShape:
    """The cluster the run plans for: `run.gpus`, or with 'auto' what the autoscaler can scale to (or what
    the cluster has now without one). A cluster whose node types have GPUs is never planned as CPU-only."""
    import ray

    resources = ray.cluster_resources()
    if config.run.gpus != "auto":
        gpus = config.run.gpus
    else:
        most = cluster.autoscaler_max_gpus()
        gpus = int(max(most or 0.0, cluster.gpus_now()))
    return ClusterShape(cpus=float(resources.get("CPU", 1.0)), gpus=gpus, cpus_per_gpu=cluster.cpus_per_gpu())


def reserve_gpus(config: Config, shape: ClusterShape, settle=lambda: None
                 ) -> tuple[GpuReservation | None, ClusterShape, bool]:
    """Hold the planned GPUs (waiting for an autoscaler if needed) and learn their memory, and whether torch
    computes on them with CUDA (False on a CPU machine's fake GPUs).

    `settle` runs meanwhile: before waiting when the GPUs are not there at once, else while they are probed.
    Whatever it raises releases the GPUs."""
    if shape.gpus < 1:
        return None, shape, False
    reservation = GpuReservation(shape.gpus, bundle_cpus(shape))
    try:
        reservation.wait(config.run.gpu_wait_s, lambda line: print(line, file=sys.stderr, flush=True), settle)
        probed = reservation.probe(meanwhile=settle)
    except ReservationTimeout as exc:
        raise RunFailed(str(exc)) from None
    except BaseException:
        reservation.release()
        raise
    broken = [g for g in probed if isinstance(g["cuda"], str)]
    if broken:
        reservation.release()
        raise RunFailed(f"node {broken[0]['node']}: {broken[0]['cuda']}; install a torch build for its driver "
                        "(or a newer driver) before running there")
    if config.run.gpu_kind != "auto":
        memory = costs.gpu_kind(config.run.gpu_kind).memory_gb
    else:  # the smallest GPU of the reservation; None on fake GPUs (no CUDA), so memory goes unchecked
        memory = min((g["memory_gb"] for g in probed if g["memory_gb"]), default=None)
    cuda = any(g["cuda"] is True for g in probed)
    return reservation, dataclasses.replace(shape, gpu_memory_gb=memory), cuda


def chain_stages(dataset, config: Config, stages: list[StageSpec], placements: dict[str, Placement],
                 runtime_env: dict | None = None, actor_for=lambda spec: spec.actor_class(),
                 progress_board: str | None = None, reservation: GpuReservation | None = None):
    """One actor pool per stage, in order, each actor pinned to its planned GPU bundle (the simulation
    benchmark passes stand-in actors)."""
    import ray.data

    if config.run.fuse_stages:
        return _chain_fused(dataset, config, stages, placements, runtime_env, actor_for, progress_board, reservation)
    block_rows = None
    for stage in stages:
        placement = placements[stage.name]
        if placement.batch_rows != block_rows:
            # One stage batch per block: each task is one batch, so every replica gets work and stages overlap.
            dataset = dataset.repartition(target_num_rows_per_block=placement.batch_rows)
            block_rows = placement.batch_rows
        context = StageContext(config=config, use_gpu=placement.num_gpus > 0, num_threads=placement.threads,
                               final_image=stage.final_image, options=stage.options, progress_board=progress_board,
                               batch_images=placement.batch_images, memory_fraction=placement.memory_fraction)
        pinned = {}
        if placement.bundles and reservation is not None:
            pinned["ray_remote_args_fn"] = reservation.pin(placement.bundles, runtime_env)
        dataset = dataset.map_batches(
            actor_for(stage), fn_constructor_kwargs={"context": context}, batch_size=placement.batch_rows,
            batch_format="numpy", zero_copy_batch=False,
            compute=ray.data.ActorPoolStrategy(size=placement.replicas,
                                               max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR),
            num_gpus=placement.num_gpus or None, num_cpus=placement.num_cpus, runtime_env=runtime_env, **pinned,
        )
    return dataset


def _chain_fused(dataset, config: Config, stages: list[StageSpec], placements: dict[str, Placement],
                 runtime_env, actor_for, progress_board, reservation):
    """One actor pool whose actors run every stage in turn (run.fuse_stages)."""
    import ray.data

    fused = fused_placement(placements, "planned")
    chain = [(actor_for(stage), StageContext(
        config=config, use_gpu=fused.num_gpus > 0, num_threads=fused.threads, final_image=stage.final_image,
        options=stage.options, progress_board=progress_board, batch_images=placements[stage.name].batch_images,
        memory_fraction=fused.memory_fraction)) for stage in stages]
    pinned = {}
    if fused.bundles and reservation is not None:
        pinned["ray_remote_args_fn"] = reservation.pin(fused.bundles, runtime_env)
    return dataset.repartition(target_num_rows_per_block=fused.batch_rows).map_batches(
        FusedStages, fn_constructor_kwargs={"stages": chain}, batch_size=fused.batch_rows, batch_format="numpy",
        zero_copy_batch=False,
        compute=ray.data.ActorPoolStrategy(size=fused.replicas, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR),
        num_gpus=fused.num_gpus or None, num_cpus=fused.num_cpus, runtime_env=runtime_env, **pinned)


def build_dataset(config: Config, info: reader.InputInfo, stages: list[StageSpec],
                  placements: dict[str, Placement], done_ids, io_cpus: float, progress_board: str,
                  reservation: GpuReservation | None = None, attempt: str | None = None):
    """Read -> one actor pool per stage -> shard writer (committing as `attempt`, numbering its shards through the
    progress board), as one streaming Ray Dataset."""
    runtime_env = {"env_vars": stage_env(config)}
    dataset = reader.read_prompts(config, info, done_ids=done_ids, num_cpus=io_cpus, runtime_env=runtime_env)
    dataset = chain_stages(dataset, config, stages, placements, runtime_env, progress_board=progress_board,
                           reservation=reservation)
    return dataset.map_batches(ShardWriter(config, progress_board, attempt), batch_size=config.output.shard_size,
                               batch_format="numpy", num_cpus=io_cpus, runtime_env=runtime_env)


def _costs_for_planning(config: Config, shape: ClusterShape) -> dict | None:
    """Per-stage batch times and memory from the checkpoints' configs; none needed without GPUs."""
    if shape.gpus < 1:
        return None
    kind = costs.gpu_kind(config.run.gpu_kind) if config.run.gpu_kind != "auto" else None
    return costs.checkpoint_profile(config, kind).stages


def _pipeline_span(stage_work: dict[str, float]) -> float | None:
    """Seconds from the first batch any stage began to the last one any stage ended (excludes start-up)."""
    begins = [v for k, v in stage_work.items() if k.startswith(BEGIN_PREFIX)]
    ends = [v for k, v in stage_work.items() if k.startswith(END_PREFIX)]
    return round(max(ends) - min(begins), 3) if begins and ends else None


QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error"}
"""Set in the stage actors unless run.verbose: a weights-loading bar per actor is noise in a batch job's log;
transformers keeps its warnings (e.g. weights a checkpoint lacks)."""


def stage_env(config: Config) -> dict[str, str]:
    """Environment variables every task and actor of the run gets."""
    return {**storage.forwarded_env(), **({} if config.run.verbose else QUIET_ENV)}


def configure_data_context(verbose: bool = False) -> None:
    """Ray Data settings for a long streaming run of actor pools."""
    import ray.data

    context = ray.data.DataContext.get_current()
    if not verbose:
        # Execution plans, resource hints and stats are for debugging a run, not for watching one.
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Without a terminal Ray Data warns that its bars are off; the run's own progress lines replace them.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    context.enable_progress_bars = sys.stderr.isatty()
    context.execution_options.preserve_order = False
    # Every pool starts its actors at once. Waiting for each pool's actors (Ray Data's wait_for_min_actors_s)
    # would start the pools one after another, loading each stage's models in turn; the run's StartupWatch
    # checks instead that every planned actor could be placed.
    context.wait_for_min_actors_s = -1


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolved_compute(config: Config, stages: list[StageSpec], plan: Plan, cuda: bool) -> dict[str, str]:
    """Per stage, the device type and dtype its actors will compute in (e.g. 'cuda fp16'): part of the run's
    identity, since they set the pixels."""
    devices = {s.name: "cuda" if cuda and plan.placements[s.name].num_gpus > 0 else "cpu" for s in stages}
    return {name: f"{device} {compute_dtype(config, name, device)}" for name, device in devices.items()}


def generate(config: Config, *, progress=None) -> RunResult:
    """Run the whole job; returns the summary that was written last under the output path."""
    started = time.time()
    # Pinned first: preflight, the record of the run and every actor then see the same commit of a Hub repo.
    config = pin_model_revisions(config)
    info = preflight(config)
    output = OutputDir(config)
    finished = output.check()
    if finished is not None and same_input(finished, info.fingerprint):
        return RunResult(summary=finished, already_done=True)
    output.probe_writable()

    connect_ray(config.run.verbose)
    configure_data_context(config.run.verbose)
    stages = stage_specs(config, info.has_prompt)
    # The output first: a second driver on it refuses at once instead of waiting for GPUs the first one holds.
    # The claim settles (see pipeline.lease) while the GPUs are reserved and probed, unless they have to be waited
    # for: then it is confirmed first, so of two drivers started together the one that lost does not wait too.
    attempt = output.claim()
    try:
        # Then the GPUs: a run that cannot get them fails before it writes anything but its lease.
        reservation, shape, cuda = reserve_gpus(config, planned_cluster(config), settle=output.confirm)
        try:
            output.confirm()
            planning_costs = _costs_for_planning(config, shape)
            plan = plan_placements(config, stages, shape, planning_costs, rows=max(1, info.rows))
            if config.run.fuse_stages:  # refused here, before anything is written, if the plan cannot be fused
                fused_placement(plan.placements, plan.layout)
            state = output.prepare(resolved_compute(config, stages, plan, cuda), info.fingerprint, info.rows)
            if state.finished is not None:  # another attempt finished it meanwhile
                return RunResult(summary=state.finished, already_done=True)
            done, done_ids = committed_ids(config, state.committed_parts)
            if done > info.rows:
                raise RunFailed(_vanished_rows(config, done, info.rows))
            todo = info.rows - done
            if done:
                print(f"resuming: {done} of {info.rows} rows already committed in "
                      f"{config.output.path}; generating the other {todo}", file=sys.stderr, flush=True)
            if todo < info.rows:  # the drain at the end depends on how many rows are left
                plan = plan_placements(config, stages, shape, planning_costs, rows=max(1, todo))
            return _execute(config, info, state, output, attempt, stages, plan, shape, reservation, done_ids, todo,
                            started, progress)
        finally:
            if reservation is not None:
                reservation.release()
    finally:
        output.release()


def committed_ids(config: Config, parts: list[str]):
    """How many rows these metadata parts hold, and a Ray reference to the set of their ids (None when there are
    none). The set is built in a task and stays in the object store, where the readers fetch it: 16 bytes a row,
    160 MB at 10M, which the driver would otherwise hold for the whole run."""
    import ray

    if not parts:
        return 0, None
    build = ray.remote(num_returns=2, num_cpus=0.1, max_retries=3)(_committed_id_set)
    count, ids = build.options(runtime_env={"env_vars": stage_env(config)}).remote(config, parts)
    try:
        return ray.get(count), ids
    except ray.exceptions.RayTaskError as failure:  # what went wrong reading the parts, not Ray's wrapper of it
        raise (failure.cause or failure) from None


def _committed_id_set(config: Config, parts: list[str]):
    ids = OutputDir(config).committed_ids(parts)
    return len(ids), ids


def _vanished_rows(config: Config, committed: int, rows: int) -> str:
    if config.input.limit is not None and rows == config.input.limit:
        return (f"{config.output.path} holds {committed} rows, more than input.limit {rows}: an earlier run "
                "here had a higher limit or none; raise the limit (or drop it), or write to a new output path")
    return (f"{config.output.path} holds {committed} rows but the input has {rows}: {committed - rows} row(s) "
            "generated earlier are no longer in the input (removed, or changed where ids derive from row "
            "positions); restore the input, or write to a new output path (or set output.mode=overwrite)")


def _execute(config: Config, info: reader.InputInfo, state, output: OutputDir, attempt: str, stages: list[StageSpec],
             plan: Plan, shape: ClusterShape, reservation: GpuReservation | None, done_ids, todo: int, started: float,
             progress) -> RunResult:
    """Stream the dataset to the end, check every row landed once, and write the report and the summary."""
    placements = plan.placements
    log.info("plan:\n%s", plan.table())
    board = f"unclip-progress-{uuid.uuid4().hex[:12]}"
    printer = ProgressPrinter(board, [s.name for s in stages], todo, config.run.progress_interval_s,
                              shard_numbers=state.shard_numbers)
    watch = StartupWatch(printer, {s.name: placements[s.name].replicas for s in stages}, MIN_ACTORS_WAIT_S)
    dataset = build_dataset(config, info, stages, placements, done_ids, task_cpus(shape.cpus), board,
                            reservation, attempt)

    new_rows = new_images = 0
    stage_work: dict[str, float] = {}
    load_failure = None
    interrupted = False
    stream = OutputStream(dataset)
    try:
        for batch in stream:
            new_rows += int(batch["rows"].sum())
            new_images += int(batch["images"].sum())
            printer.written = new_rows
            merge_stage_counters(stage_work, batch)
            if output.lost_lease():
                raise LeaseError(output.lost_lease())
            if progress is not None:
                progress(new_rows, todo)
    except Exception as exc:
        if output.lost_lease() and not isinstance(exc, LeaseError):
            # The writers' refusals to commit (FencedOut) are the consequence; the lost lease is the cause.
            raise LeaseError(output.lost_lease()) from None
        load_failure = _stage_load_error(exc)
        if load_failure is None:
            raise
    except KeyboardInterrupt:
        interrupted = True
    finally:
        watch.stop()
        stream.close()
        actors = printer.placement()
        printer.end_actors()  # so a next run in this process gets their CPUs and GPUs, even after a failure
        printer.close()
    if interrupted and watch.failure:
        raise RunFailed(watch.failure)
    if interrupted:  # counted after the shutdown: writers may have committed more than the stream delivered
        raise RunInterrupted(output.committed_rows())
    if load_failure is not None:
        raise RunFailed(f"{load_failure.rstrip('.')}; fix the checkpoint and rerun (finished rows are kept)")

    output.committed_parts(remove_others=True)  # a dead attempt's late commits are generated again: drop them
    scan = scan_metadata(output)  # one pass: the accounting below and the report both use it
    if scan.duplicates:
        raise RunFailed(f"{len(scan.duplicates)} row id(s) were committed more than once (e.g. "
                        f"{', '.join(repr(i) for i in scan.duplicates[:3])}); the output is not trustworthy as it "
                        "is: rerun with output.mode=overwrite")
    if scan.rows > info.rows:
        raise RunFailed(_vanished_rows(config, scan.rows, info.rows))
    if scan.rows != info.rows:
        # Never declare success unless every input row is accounted for (a vanished or changed input file).
        raise RunFailed(f"only {scan.rows} of {info.rows} input rows reached the output; the input changed "
                        "or could not be read during the run; rerun the same command to finish (finished rows are kept)")
    wall = time.time() - started
    summary = {
        "status": "complete",
        "output": config.output.path,
        "attempt": attempt,
        "counts": {
            "input_rows": info.rows,
            "ok": scan.ok,
            "error": scan.error,
            "skipped": info.rows - todo,
            "images": scan.images,
            "generated_this_attempt": new_rows,
            "images_this_attempt": new_images,
        },
        "input_fingerprint": info.fingerprint,
        "wall_time_s": round(wall, 3),
        "pipeline_span_s": _pipeline_span(stage_work),
        "images_per_s": round(new_images / wall, 4) if wall > 0 else None,
        "stages": [{"name": s.name, "images_per_row": s.images_per_row, **vars(placements[s.name]),
                    "images": int(stage_work.get(IMAGES_PREFIX + s.name, 0)),
                    "busy_s": round(stage_work.get(SECONDS_PREFIX + s.name, 0.0), 3),
                    "oom_halvings": int(stage_work.get(OOM_PREFIX + s.name, 0)),
                    "active_s": round(stage_work.get(END_PREFIX + s.name, 0.0)
                                      - stage_work.get(BEGIN_PREFIX + s.name, 0.0), 3),
                    "gpu_cost_per_row": plan.row_costs.get(s.name)} for s in stages],
        "plan": {"layout": plan.layout, "gpus": plan.gpus, "gpu_memory_gb": plan.gpu_memory_gb,
                 "groups": [{"stages": g.stages, "gpus": g.bundles, "memory_gb": round(g.memory_gb, 3)}
                            for g in plan.groups],
                 "bound_rows_per_s": plan.bound, "predicted_rows_per_s": plan.predicted},
        "cluster": {"cpus": shape.cpus, "gpus": shape.gpus},
        "actors": sorted(actors, key=lambda a: (a["stage"], a["bundle"] if a["bundle"] is not None else -1)),
        "models": {k: v for k, v in redacted(config)["models"].items()},
        "config": redacted(config),
        "versions": package_versions(),
    }
    # The report first: the summary is the commit marker of the whole run, so it is written last.
    summary["report"] = {"file": REPORT_FILE, "contact_sheet": write_report(output, summary, scan)["contact_sheet"]}
    output.write_json(SUCCESS_FILE, summary)
    return RunResult(summary=summary)
