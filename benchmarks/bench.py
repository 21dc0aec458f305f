"""Benchmarks (not tests): `python -m benchmarks.bench --simulate dalle2 | --tiny | --rerank | --memory | --plan`.

Each mode prints a table; `--json PATH` also writes the figures. See docs/BENCHMARKS.md for results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
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
    from benchmarks import simulation
    from pipeline.reservation import GpuReservation

    profile = _profile(args.simulate, args.gpu)
    config, stages, plan = _planned(args, profile)
    print(f"--simulate {args.simulate}: {profile.source}; {args.gpus} x {profile.gpu.name}")
    print(plan.table())
    row_seconds = sum(profile.stages[s.name].seconds_per_image_at(plan.placements[s.name].batch_images)
                      * s.images_per_row for s in stages)
    ray_runs = args.gpus <= args.max_ray_gpus
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


def _peak_rss_during(fn):
    import psutil

    process = psutil.Process()
    peak = [process.memory_info().rss]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    before = process.memory_info().rss
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, before, peak[0]


def memory(args) -> dict:
    from benchmarks import simulation
    from pipeline.plan import ClusterShape, plan_placements, stage_specs
    from pipeline.reservation import GpuReservation

    config = _config(*_batch_sets(args.memory_batch))
    stages = stage_specs(config)
    _init_ray(args.gpus)
    import ray

    plan = plan_placements(config, stages, ClusterShape(ray.cluster_resources()["CPU"], args.gpus), rows=args.prompts)
    reservation = GpuReservation(args.gpus, plan.bundle_cpus)
    reservation.wait(300, print)
    row_seconds = {s.name: simulation.BatchTime(0.0, 0.0) for s in stages}
    locks = tempfile.mkdtemp(prefix="simgpu-")
    figures = {}
    for rows in sorted({args.prompts // 10, args.prompts}):
        started = time.time()
        measured, before, peak = _peak_rss_during(
            lambda rows=rows: simulation.run_pipeline(config, stages, plan, row_seconds, rows, locks, reservation,
                                                      block_rows=args.memory_batch))
        figures[rows] = {"rows": measured.rows, "driver_rss_before_mb": round(before / 2**20, 1),
                         "driver_rss_peak_mb": round(peak / 2**20, 1),
                         "growth_mb": round((peak - before) / 2**20, 1), "seconds": round(time.time() - started, 1)}
    table = [("prompts", "driver RSS before MB", "peak MB", "growth MB", "seconds")]
    table += [(f["rows"], f["driver_rss_before_mb"], f["driver_rss_peak_mb"], f["growth_mb"], f["seconds"])
              for f in figures.values()]
    _print_rows("--memory: driver RSS while streaming a simulated run (zero-cost stages)", table)
    small, large = figures[min(figures)], figures[max(figures)]
    return {"mode": "memory", "runs": list(figures.values()),
            "peak_ratio_large_over_small": round(large["driver_rss_peak_mb"] / small["driver_rss_peak_mb"], 3)}


# ---------------------------------------------------------------- --rerank


def rerank(args) -> dict:
    from benchmarks.local import prompt_batch, run_stages
    from pipeline.writer import IMAGES_PREFIX, SECONDS_PREFIX

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
    mode.add_argument("--memory", action="store_true", help="driver peak RSS for a simulated run of --prompts")
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
    parser.add_argument("--default-fraction", type=int, default=8,
                        help="--simulate: ray_data_default runs on prompts / this (it is slow)")
    parser.add_argument("--memory-batch", type=int, default=1000)
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
        args.prompts = 1_000_000 if args.memory else 2000
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
