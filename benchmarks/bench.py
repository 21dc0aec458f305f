"""Benchmarks (not tests): `python -m benchmarks.bench --simulate dalle2 | --tiny | --rerank | --memory | --plan`.

Each mode prints a table; `--json PATH` also writes the figures. See docs/BENCHMARKS.md for results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from pipeline.config import STAGE_NAMES



def _config(*sets: str, preset: str = "tiny", config_path: str | None = None):
    from pipeline.config import load_config

    return load_config(config_path, list(sets), input_path="unused", output_path="unused", preset=preset)


def _batch_sets(images: int) -> list[str]:
    return [f"stages.{name}.batch_size={images}" for name in STAGE_NAMES]


def _init_ray(gpus: int, cpus: int | None = None) -> None:
    import ray

    ray.init(num_cpus=cpus or max(8, 4 * (os.cpu_count() or 2)), num_gpus=gpus, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    import ray.data

    from pipeline.run import configure_data_context

    configure_data_context()
    ray.data.DataContext.get_current().enable_progress_bars = False


def _print_rows(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


# ---------------------------------------------------------------- --simulate


def _profile(name_or_path: str, gpu: str | None):
    from pipeline import costs

    import dataclasses

    profile = costs.load_profile(name_or_path)
    # A profile may leave stages out: they cost nothing.
    profile = dataclasses.replace(profile, stages={n: profile.stages.get(n, costs.StageCost()) for n in STAGE_NAMES})
    return profile.on(costs.gpu_kind(gpu)) if gpu else profile


def _planned(args, profile):
    """The product's plan for the profile on --gpus GPUs of the profile's kind."""
    from pipeline.plan import ClusterShape, plan_placements, stage_specs

    sets = _batch_sets(args.batch_images) if args.batch_images else []
    config = _config(*sets, *args.overrides)
    stages = stage_specs(config)
    cluster = ClusterShape(cpus=_sim_cpus(args.gpus), gpus=args.gpus, gpu_memory_gb=profile.gpu.memory_gb)
    return config, stages, plan_placements(config, stages, cluster, profile.stages, rows=args.prompts)


def _sim_cpus(gpus: int) -> int:
    return max(8, 2 * gpus)


def _batch_times(stages, plan, profile, scale: float) -> dict:
    """Each stage's batch time in simulated seconds: (a + rows x images per row x c) x scale."""
    from benchmarks.simulation import BatchTime

    return {s.name: BatchTime(profile.stages[s.name].batch_overhead_s * scale,
                              profile.stages[s.name].seconds_per_image * s.images_per_row * scale) for s in stages}


def data_parallel_batches(stages, plan, profile) -> tuple[dict[str, int] | None, float]:
    """Data parallel in its best form: every model on every GPU, one stage running at a time, each stage at
    the product's batch rows, halved (largest activations first) until everything fits. Returns the rows per
    batch of each stage (None: does not fit even at one row) and the GB it needs."""
    from pipeline.costs import CUDA_CONTEXT_GB

    rows = {s.name: plan.placements[s.name].batch_rows for s in stages}
    per_row = {s.name: s.images_per_row for s in stages}
    weights = sum(profile.stages[s.name].weights_gb for s in stages) + CUDA_CONTEXT_GB

    def activations(name):
        return profile.stages[name].activation_gb_per_image * rows[name] * per_row[name]

    budget = profile.gpu.memory_gb * 0.9
    while weights + max(activations(n) for n in rows) > budget:
        hungriest = max(rows, key=activations)
        if rows[hungriest] == 1:
            return None, weights + activations(hungriest)
        rows[hungriest] //= 2
    return rows, weights + max(activations(n) for n in rows)


def event_predictions(stages, plan, times, rows: int, gpus: int, bound: float, dp_rows: dict | None) -> dict:
    """The event model of the same dynamics: the product's layout and, if it fits, data parallel."""
    import math

    from benchmarks import event_model

    timing = {s.name: event_model.StageTiming(times[s.name].overhead_s, times[s.name].seconds_per_row,
                                              plan.placements[s.name].batch_rows) for s in stages}
    actors = [event_model.ActorSpec(s.name, bundle) for s in stages for bundle in plan.placements[s.name].bundles]
    out = {"pipeline": event_model.simulate_mean([s.name for s in stages], actors, timing, rows, gpus, repeats=3)}
    if dp_rows:
        block = max(dp_rows.values())  # one task carries a block through every stage, in micro-batches
        whole = event_model.StageTiming(sum(times[n].overhead_s * math.ceil(block / b) for n, b in dp_rows.items()),
                                        sum(times[n].seconds_per_row for n in dp_rows), block)
        out["data_parallel"] = event_model.simulate_mean(
            ["all"], [event_model.ActorSpec("all", g) for g in range(gpus)], {"all": whole}, rows, gpus, repeats=3)
    return {name: {"efficiency": round(r.throughput / bound, 4), "throughput": round(r.throughput, 4)}
            for name, r in out.items()}


def simulate(args) -> dict:
    from benchmarks import memory_run, simulation
    from pipeline.reservation import GpuReservation

    profile = _profile(args.simulate, args.gpu)
    config, stages, plan = _planned(args, profile)
    print(f"--simulate {args.simulate}: {profile.source}; {args.gpus} x {profile.gpu.name}")
    print(plan.table())
    row_seconds = sum(profile.stages[s.name].seconds_per_image_at(plan.placements[s.name].batch_images)
                      * s.images_per_row for s in stages)
    ray_runs = args.gpus <= args.max_ray_gpus
    memory_run.set_stage_queue_ratio(args.stage_queue_ratio)
    # Simulated seconds per real GPU-second: Ray runs are squeezed so the ideal run lasts --ideal-seconds (and
    # the event model runs at the same scale, to be checked against them); the event model alone runs in real
    # GPU-seconds, where Ray's fixed per-task costs weigh what they would on a real cluster.
    scale = args.ideal_seconds * args.gpus / (args.prompts * row_seconds) if ray_runs else 1.0
    times = _batch_times(stages, plan, profile, scale)
    bound = args.gpus / sum(times[s.name].of(plan.placements[s.name].batch_rows) / plan.placements[s.name].batch_rows
                            for s in stages)
    dp_rows, dp_memory = data_parallel_batches(stages, plan, profile)
    dp_fits = dp_rows is not None
    predictions = event_predictions(stages, plan, times, args.prompts, args.gpus, bound, dp_rows)
    results: dict = {}
    started = time.time()
    if ray_runs:
        _init_ray(args.gpus, _sim_cpus(args.gpus))
        locks = tempfile.mkdtemp(prefix="simgpu-")
        reservation = GpuReservation(args.gpus, plan.bundle_cpus)
        reservation.wait(300, print)
        results["pipeline"] = simulation.run_pipeline(config, stages, plan, times, args.prompts, locks, reservation)
        reservation.release()
        default_rows = max(args.gpus * 10, args.prompts // args.default_fraction)
        results["ray_data_default"] = simulation.run_ray_data_default(stages, plan, times, default_rows, args.gpus,
                                                                      locks)
        if dp_fits:
            results["data_parallel"] = simulation.run_data_parallel(stages, dp_rows, times, args.prompts, args.gpus,
                                                                    locks, bound)
    elapsed = time.time() - started
    table = [("schedule", "prompts", "span s", "throughput (sim rows/s)", "efficiency (Ray)", "efficiency (event model)")]
    for name in ("pipeline", "ray_data_default", "data_parallel"):
        m = results.get(name)
        predicted = predictions.get(name, {}).get("efficiency", "-")
        if name == "data_parallel" and not dp_fits:
            table.append((name, "-", "-", "-", f"does not fit (>= {dp_memory:.1f} GB at batch 1; "
                                               f"{profile.gpu.memory_gb:g} GB GPUs)", "-"))
        elif m is not None or name in predictions:
            table.append((name, m.rows if m else "-", m.span_s if m else "-", m.throughput if m else "-",
                          m.efficiency if m else "-", predicted))
    _print_rows(f"{args.gpus} simulated GPUs, time scale {scale:.4f} (1 simulated s = {1 / scale:.2f} GPU-s); "
                f"{elapsed:.0f}s of Ray runs", table)
    ours = results.get("pipeline")
    efficiency = ours.efficiency if ours else predictions["pipeline"]["efficiency"]
    return {
        "mode": "simulate", "profile": args.simulate, "gpu": profile.gpu.name, "gpus": args.gpus,
        "stage_queue_ratio": args.stage_queue_ratio,
        "data_parallel_memory_gb": round(dp_memory, 2), "data_parallel_batch_rows": dp_rows,
        "prompts": args.prompts, "layout": plan.layout,
        "efficiency": efficiency, "throughput": ours.throughput if ours else None, "bound": ours.bound if ours else None,
        "measured_by": "ray" if ours else "event model",
        "event_model": predictions,
        "throughput_real_rows_per_s": round(ours.throughput * scale, 4) if ours else None, "time_scale": scale,
        "predicted_efficiency": round(plan.predicted / plan.bound, 4),
        "placement_seen": ours.placement if ours else None,
        "plan": {n: vars(p) for n, p in plan.placements.items()},
        "baselines": {name: {"efficiency": m.efficiency, "throughput": m.throughput, "prompts": m.rows}
                      for name, m in results.items() if name != "pipeline"}
        | ({} if dp_fits else {"data_parallel": {"efficiency": None, "fits": False, "memory_gb": round(dp_memory, 2)}}),
    }


# ---------------------------------------------------------------- --memory


GOAL_PEAK_MB = 1536.0
"""Peak driver RSS goal: 1.5 GiB."""
GOAL_GROWTH = 1.10
"""Peak at --prompts over the peak at a tenth of them, at most."""


def _memory_sets(args) -> list[str]:
    return ["run.gpus=0", "output.format=webdataset", f"output.shard_size={args.memory_shard_size}",
            "run.progress_interval_s=60", *_batch_sets(args.memory_batch), *args.overrides]


def _measured_driver(args, name: str, input_dir: str, output_dir: str) -> dict:
    """One `generate` in a fresh driver process (benchmarks/memory_run.py); returns its figures."""
    import subprocess

    spec_path = os.path.join(args.memory_dir, f"{name}.spec.json")
    result_path = os.path.join(args.memory_dir, f"{name}.result.json")
    spec = {"input": input_dir, "output": output_dir, "sets": _memory_sets(args), "result": result_path,
            "cpus": args.memory_cpus, "traced": args.memory_tracemalloc, "stage_queue_ratio": args.stage_queue_ratio}
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    print(f"[memory] {time.strftime('%H:%M:%S')} {name}: generate {input_dir} -> {output_dir}", flush=True)
    # Its own session: a signal meant for this benchmark's process group does not cut a measurement short.
    subprocess.run([sys.executable, "-m", "benchmarks.memory_run", "--child", spec_path], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), start_new_session=True)
    with open(result_path, encoding="utf-8") as fh:
        figures = json.load(fh)
    print(f"[memory] {time.strftime('%H:%M:%S')} {name}: before {figures['driver_rss_before_mb']} MB, peak "
          f"{figures['driver_rss_peak_mb']} MB, {figures['seconds']} s; counts {figures['counts']}", flush=True)
    return figures


def _metadata_parts(output_dir: str) -> list[str]:
    folder = os.path.join(output_dir, "metadata")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".parquet") and n[0] != ".")


def _shard_count(output_dir: str) -> int:
    return sum(1 for n in os.listdir(os.path.join(output_dir, "shards")) if n.endswith(".tar"))


def _prompt_ids(parts: list[str]) -> np.ndarray:
    """Sorted digests of the prompt ids in these metadata parts (each prompt once, whatever its images)."""
    import pyarrow.parquet as pq

    from pipeline.rowids import DIGEST, digests

    chunks = [digests(pq.read_table(p, columns=["id"]).column("id").to_pylist()) for p in parts]
    return np.unique(np.concatenate(chunks)) if chunks else np.empty(0, DIGEST)


def _check_complete(figures: dict, manifest: dict, keep: int, output_dir: str, generated: int, skipped: int) -> None:
    """The summary accounts for every input row, and the output holds one tar per committed part."""
    import pyarrow.parquet as pq

    rows, errors = manifest["rows"], manifest["error_rows"]
    expected = {"input_rows": rows, "ok": rows - errors, "error": errors, "images": (rows - errors) * keep,
                "generated_this_attempt": generated, "skipped": skipped}
    counts = figures["counts"]
    wrong = {k: (counts.get(k), v) for k, v in expected.items() if counts.get(k) != v}
    parts = _metadata_parts(output_dir)
    metadata_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    if metadata_rows != expected["images"] + errors:
        wrong["metadata_rows"] = (metadata_rows, expected["images"] + errors)
    if _shard_count(output_dir) != len(parts):
        wrong["tar_shards"] = (_shard_count(output_dir), len(parts))
    if figures["status"] != "complete" or figures["already_done"]:
        wrong["status"] = (figures["status"], "complete")
    if wrong:
        raise RuntimeError(f"run in {output_dir} is incomplete (got, expected): {wrong}")
    figures["checked"] = {**expected, "metadata_parts": len(parts), "metadata_rows": metadata_rows}


def _half_finish(output_dir: str, saved_ids: str) -> int:
    """Make a finished run half-finished: drop its summary and every other metadata part (their tar shards
    become uncommitted, which the resume deletes). Saves the dropped prompts' id digests; returns how many."""
    os.remove(os.path.join(output_dir, "_SUCCESS.json"))
    dropped = _metadata_parts(output_dir)[::2]
    ids = _prompt_ids(dropped)
    np.save(saved_ids, ids)
    for path in dropped:
        os.remove(path)
    return len(ids)


def _check_regenerated(output_dir: str, saved_ids: str) -> None:
    """The resume's own parts hold exactly the prompts that were dropped."""
    from pipeline.writer import shard_number

    with open(os.path.join(output_dir, "_attempt.json"), encoding="utf-8") as fh:
        ledger = json.load(fh)
    numbers = {p: shard_number(os.path.basename(p)[: -len(".parquet")]) for p in _metadata_parts(output_dir)}
    mine = [p for p, n in numbers.items() if n is not None and ledger["first_shard"] <= n < ledger["shard_end"]]
    regenerated, dropped = _prompt_ids(mine), np.load(saved_ids)
    if not np.array_equal(regenerated, dropped):
        raise RuntimeError(f"the resume regenerated {len(regenerated)} prompts, not the {len(dropped)} dropped ones "
                           f"({len(np.setdiff1d(dropped, regenerated))} missing, "
                           f"{len(np.setdiff1d(regenerated, dropped))} not dropped)")


def memory(args) -> dict:
    """Driver RSS of the product's own run (generate) with zero-cost stage bodies: a full run of a tenth of
    --prompts, a full run of --prompts, and the resume of that run made half-finished."""
    import shutil

    from benchmarks import memory_run

    large = args.prompts
    small = max(1, large // 10)
    keep = _config(*_memory_sets(args)).rerank.keep
    os.makedirs(args.memory_dir, exist_ok=True)
    runs = []
    variants = [v.strip() for v in args.memory_variants.split(",") if v.strip()]
    unknown = set(variants) - {"ids", "derived-ids"}
    if unknown or not variants:
        raise SystemExit(f"--memory-variants: ids and/or derived-ids, got {args.memory_variants!r}")
    for tag in variants:
        with_ids = tag == "ids"
        for rows in (small, large):
            input_dir = os.path.join(args.memory_dir, f"input-{rows}-{tag}")
            output_dir = os.path.join(args.memory_dir, f"output-{rows}-{tag}")
            shutil.rmtree(output_dir, ignore_errors=True)
            shutil.rmtree(input_dir, ignore_errors=True)
            began = time.time()
            manifest = memory_run.write_prompts(input_dir, rows, with_ids, file_rows=args.memory_file_rows)
            print(f"[memory] {time.strftime('%H:%M:%S')} input of {rows} prompts ({tag}, {manifest['files']} "
                  f"files) written in {time.time() - began:.0f} s", flush=True)
            name = f"full-{rows}-{tag}"
            figures = _measured_driver(args, name, input_dir, output_dir)
            _check_complete(figures, manifest, keep, output_dir, generated=rows, skipped=0)
            runs.append({"prompts": rows, "ids": tag, "phase": "full", **figures})
            if rows == large and with_ids:
                saved = os.path.join(args.memory_dir, "dropped-ids.npy")
                dropped = _half_finish(output_dir, saved)
                print(f"[memory] dropped the summary and {dropped} prompts' metadata parts", flush=True)
                name = f"resume-{rows}-{tag}"
                figures = _measured_driver(args, name, input_dir, output_dir)
                _check_complete(figures, manifest, keep, output_dir, generated=dropped, skipped=rows - dropped)
                _check_regenerated(output_dir, saved)
                runs.append({"prompts": rows, "ids": tag, "phase": "resume half", **figures})
            if not args.memory_keep:
                shutil.rmtree(output_dir, ignore_errors=True)
                shutil.rmtree(input_dir, ignore_errors=True)
    if not args.memory_keep:
        shutil.rmtree(args.memory_dir, ignore_errors=True)

    table = [("prompts", "ids", "phase", "driver RSS before MB", "peak MB", "peak anon MB", "peak shmem MB", "seconds")]
    table += [(r["prompts"], r["ids"], r["phase"], r["driver_rss_before_mb"], r["driver_rss_peak_mb"],
               r.get("peak_anon_mb", "-"), r.get("peak_shmem_mb", "-"), r["seconds"]) for r in runs]
    _print_rows("--memory: driver RSS of generate() on the real data path (stand-in stage bodies)", table)
    phase_names = ["preflight", "setup", "prepare", "streaming", "accounting", "report", "summary"]
    table = [("prompts", "ids", "phase", *[f"{p} peak MB / s" for p in phase_names])]
    for r in runs:
        table.append((r["prompts"], r["ids"], r["phase"],
                      *[f"{r['phases'][p]['peak_mb']} / {r['phases'][p]['seconds']}" if p in r["phases"] else "-"
                        for p in phase_names]))
    _print_rows("peak driver RSS (MB) and seconds by phase of generate()", table)

    def peak(rows, tag):
        return next(r["driver_rss_peak_mb"] for r in runs if (r["prompts"], r["phase"], r["ids"]) == (rows, "full", tag))

    ratios = {tag: round(peak(large, tag) / peak(small, tag), 3) for tag in variants}
    highest = max(r["driver_rss_peak_mb"] for r in runs)
    met = max(ratios.values()) <= GOAL_GROWTH and highest < GOAL_PEAK_MB
    print()
    for tag, ratio in ratios.items():
        print(f"{tag}: peak({large}) / peak({small}) = {ratio} (goal <= {GOAL_GROWTH})")
    print(f"highest peak {highest} MB (goal < {GOAL_PEAK_MB:g} MB); goals {'met' if met else 'NOT met'}")
    return {"mode": "memory", "settings": _memory_sets(args), "cpus_for_ray": args.memory_cpus, "runs": runs,
            "stage_queue_ratio": args.stage_queue_ratio,
            "peak_ratio_large_over_small": ratios[variants[0]], "peak_ratios": ratios, "highest_peak_mb": highest,
            "goal": {"peak_mb_below": GOAL_PEAK_MB, "growth_at_most": GOAL_GROWTH, "met": met}}


# ---------------------------------------------------------------- --rerank


def rerank(args) -> dict:
    from benchmarks.local import prompt_batch, run_stages
    from pipeline.counters import IMAGES_PREFIX, SECONDS_PREFIX

    prompts = [f"a benchmark prompt number {i}" for i in range(args.rerank_prompts)]
    figures = {}
    for at in ("decoder", "upsampler_256"):
        config = _config(f"rerank.candidates={args.candidates}", f"rerank.keep={args.keep}", f"rerank.at={at}")
        batch = prompt_batch(prompts, np.arange(len(prompts) * args.candidates).reshape(len(prompts), -1))
        actors: dict = {}
        run_stages(config, dict(batch), actors=actors)  # warm-up
        out = run_stages(config, dict(batch), actors=actors)
        kept = len(prompts) * args.keep
        images = {s: int(out[IMAGES_PREFIX + s].sum()) for s in ("upsampler_256", "upsampler_1024")}
        seconds = {s: float(out[SECONDS_PREFIX + s].sum()) for s in ("upsampler_256", "upsampler_1024")}
        figures[at] = {"kept_images": kept, "upsampler_images": images, "upsampler_seconds": seconds,
                       "upsampler_seconds_per_kept_image": round(sum(seconds.values()) / kept, 4),
                       "upsampler_256_images_per_kept_image": images["upsampler_256"] / kept}
    ratio = (figures["decoder"]["upsampler_seconds_per_kept_image"]
             / figures["upsampler_256"]["upsampler_seconds_per_kept_image"])
    # The reranker sits before the 1024 stage in both settings, so only the 256 stage's work can shrink.
    ratio_256 = figures["decoder"]["upsampler_seconds"]["upsampler_256"] / figures["upsampler_256"]["upsampler_seconds"]["upsampler_256"]
    table = [("rerank.at", "256 images", "1024 images", "256 s", "1024 s", "upsampler s / kept image")]
    for at, f in figures.items():
        table.append((at, f["upsampler_images"]["upsampler_256"], f["upsampler_images"]["upsampler_1024"],
                      round(f["upsampler_seconds"]["upsampler_256"], 3), round(f["upsampler_seconds"]["upsampler_1024"], 3),
                      f["upsampler_seconds_per_kept_image"]))
    _print_rows(f"--rerank: N={args.candidates} candidates, keep k={args.keep}, {len(prompts)} prompts, tiny preset "
                f"(CPU); decoder / upsampler_256: 256-stage work {ratio_256:.3f}, both upsamplers {ratio:.3f}", table)
    return {"mode": "rerank", "candidates": args.candidates, "keep": args.keep, "per_setting": figures,
            "upsampler_work_ratio": round(ratio, 4), "upsampler_256_work_ratio": round(ratio_256, 4),
            "upsampler_256_images_ratio": (figures["decoder"]["upsampler_256_images_per_kept_image"]
                                           / figures["upsampler_256"]["upsampler_256_images_per_kept_image"])}


# ---------------------------------------------------------------- --tiny


def tiny(args) -> dict:
    import ray
    import torch

    from pipeline.config import load_config
    from pipeline.run import generate
    from benchmarks.reference import Reference

    workdir = tempfile.mkdtemp(prefix="bench-tiny-")
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [f"a benchmark prompt number {i}" for i in range(args.tiny_prompts)]
    pq.write_table(pa.table({"prompt": prompts}), os.path.join(workdir, "prompts.parquet"))
    batch = args.batch_images or 4
    sets = _batch_sets(batch) + ["models.clip=null", "output.mode=overwrite"]
    config = load_config(None, sets, input_path=os.path.join(workdir, "prompts.parquet"),
                         output_path=os.path.join(workdir, "out"), preset="tiny")
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    summary = generate(config).summary
    ray.shutdown()
    ours_span = summary["pipeline_span_s"]  # first batch of any stage to last batch of the last one
    ours = len(prompts) / ours_span

    from pipeline import checkpoints

    reference = Reference(checkpoints.local_dir("tiny://unclip", "unclip"),
                          checkpoints.local_dir("tiny://upsampler_1024", "upsampler_1024"))
    steps = config.stages

    def loop():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            generators = [torch.Generator().manual_seed(j) for j in range(i, i + len(chunk))]
            images = reference.unclip(chunk, generator=generators, prior_num_inference_steps=steps.prior.steps,
                                      decoder_num_inference_steps=steps.decoder.steps,
                                      super_res_num_inference_steps=steps.upsampler_256.steps,
                                      output_type="np").images
            reference.upscaler(prompt=chunk, image=torch.from_numpy(images).permute(0, 3, 1, 2),
                               generator=generators, num_inference_steps=steps.upsampler_1024.steps,
                               output_type="np")

    loop_start = time.perf_counter()
    loop()
    diffusers_span = time.perf_counter() - loop_start
    theirs = len(prompts) / diffusers_span
    table = [("runner", "prompts", "span s", "images/s"),
             ("unclip-ray pipeline (Ray, actor pools)", len(prompts), round(ours_span, 2), round(ours, 4)),
             ("diffusers UnCLIPPipeline + x4 upscaler loop", len(prompts), round(diffusers_span, 2), round(theirs, 4))]
    _print_rows(f"--tiny: tiny preset on this machine ({os.cpu_count()} CPUs), {batch} images per forward, "
                f"ratio {ours / theirs:.3f}", table)
    return {"mode": "tiny", "prompts": len(prompts), "batch_images": batch, "pipeline_images_per_s": round(ours, 4),
            "diffusers_images_per_s": round(theirs, 4), "ratio": round(ours / theirs, 4)}


# ---------------------------------------------------------------- --plan


def show_plan(args) -> dict:
    from pipeline import costs
    from pipeline.plan import ClusterShape, plan_placements, stage_specs

    config = _config(preset=args.preset, config_path=args.config, *args.overrides)
    stages = stage_specs(config)
    if args.calibrate:
        from benchmarks.calibrate import calibrate

        profile = calibrate(config)
    elif args.profile:
        profile = _profile(args.profile, args.gpu)
    else:
        profile = costs.checkpoint_profile(config, costs.gpu_kind(args.gpu) if args.gpu else None)
    gpus = args.gpus
    cluster = ClusterShape(cpus=_sim_cpus(gpus), gpus=gpus, gpu_memory_gb=profile.gpu.memory_gb)
    plan = plan_placements(config, stages, cluster, profile.stages, rows=args.prompts)
    print(f"plan for {gpus} x {profile.gpu.name} ({profile.gpu.memory_gb:g} GB), {args.prompts} prompts; "
          f"costs: {profile.source}")
    print(plan.table())
    print("\nactors per GPU (GPU i = bundle i of the run's placement group; each actor is pinned to it):")
    hosted = plan.bundle_of_actors()
    shown = sorted(hosted)[:8] + (sorted(hosted)[-1:] if len(hosted) > 8 else [])
    for bundle in shown:
        print(f"  GPU {bundle:4d}: " + ", ".join(f"{n} {plan.placements[n].num_gpus:.3f}" for n in hosted[bundle]))
    if len(hosted) > len(shown):
        print(f"  ... ({len(hosted) - len(shown)} more GPUs laid out the same way as their group)")
    row_seconds = sum(plan.row_costs.values())
    times = _batch_times(stages, plan, profile, 1.0)
    bound = gpus / sum(times[s.name].of(plan.placements[s.name].batch_rows) / plan.placements[s.name].batch_rows
                       for s in stages)
    predictions = event_predictions(stages, plan, times, args.prompts, gpus, bound, None)
    print(f"\nprediction: planner {plan.predicted / plan.bound:.3f} of the bound, event model "
          f"{predictions['pipeline']['efficiency']:.3f} ({args.prompts} prompts, {row_seconds:.4f} GPU-s per row)")
    return {"mode": "plan", "gpus": gpus, "gpu": profile.gpu.name, "layout": plan.layout, "source": profile.source,
            "bound": plan.bound, "predicted": plan.predicted, "event_model": predictions,
            "actors_per_gpu": {str(b): hosted[b] for b in sorted(hosted)},
            "plan": {n: vars(p) for n, p in plan.placements.items()}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--simulate", metavar="PROFILE",
                      help="scheduling benchmark, no models: a profile name (dalle2, karlo) or a JSON profile file")
    mode.add_argument("--tiny", action="store_true", help="real tiny models vs a diffusers loop on this machine")
    mode.add_argument("--rerank", action="store_true", help="upsampler work per kept image by rerank.at")
    mode.add_argument("--memory", action="store_true",
                      help="driver peak RSS of generate() (stand-in stage bodies) at --prompts / 10 and --prompts, "
                           "and of resuming the --prompts run half-finished")
    mode.add_argument("--plan", action="store_true", help="print the placement plan and its predicted bound")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--ideal-seconds", type=float, default=120.0,
                        help="--simulate: length of a perfectly balanced run (sets the time scale)")
    parser.add_argument("--batch-images", type=int, default=None,
                        help="images per forward pass in every stage (default: the planner's choice)")
    parser.add_argument("--gpu", help="GPU kind for memory and speed (t4, a10g, l4, a100-40gb, a100-80gb, h100-80gb); "
                                      "default: the profile's")
    parser.add_argument("--max-ray-gpus", type=int, default=16,
                        help="--simulate: above this many GPUs only the event model runs (Ray would need a process "
                             "per actor on this machine)")
    parser.add_argument("--stage-queue-ratio", type=float, default=None,
                        help="--simulate, --memory (an experiment): bound how far a stage may run ahead of the next "
                             "from the first block, as a multiple of the next stage's inputs in flight (default: Ray "
                             "Data's own backpressure, which applies that bound only past half an operator's "
                             "object-store budget)")
    parser.add_argument("--default-fraction", type=int, default=8,
                        help="--simulate: ray_data_default runs on prompts / this (it is slow)")
    parser.add_argument("--memory-batch", type=int, default=1000, help="--memory: images per batch in every stage")
    parser.add_argument("--memory-shard-size", type=int, default=10000, help="--memory: output.shard_size")
    parser.add_argument("--memory-file-rows", type=int, default=1_000_000, help="--memory: prompts per input file")
    parser.add_argument("--memory-cpus", type=int, default=max(4, os.cpu_count() or 2),
                        help="--memory: logical CPUs of the local Ray each measured driver starts")
    parser.add_argument("--memory-dir", default="/tmp/membench", help="--memory: inputs and outputs (deleted after)")
    parser.add_argument("--memory-keep", action="store_true", help="--memory: keep --memory-dir")
    parser.add_argument("--memory-variants", default="ids",
                        help="--memory: inputs to measure, comma-separated: ids (an id column of unique strings; "
                             "the resume runs on this one) and/or derived-ids (no id column)")
    parser.add_argument("--memory-tracemalloc", action="store_true",
                        help="--memory: also record the Python heap peak of each phase (slower)")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--rerank-prompts", type=int, default=4)
    parser.add_argument("--tiny-prompts", type=int, default=24)
    parser.add_argument("--profile", help="--plan: a cost profile (dalle2, karlo, or a JSON file) instead of the "
                                          "checkpoints")
    parser.add_argument("--calibrate", action="store_true", help="--plan: measure stage costs on this machine")
    parser.add_argument("--config")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 10_000_000 if args.memory else 2000
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = ("simulate" if args.simulate else "tiny" if args.tiny else "rerank" if args.rerank
            else "memory" if args.memory else "plan")
    figures = {"simulate": simulate, "tiny": tiny, "rerank": rerank, "memory": memory, "plan": show_plan}[mode](args)
    figures["machine"] = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
