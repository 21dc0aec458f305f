"""Benchmarks (not tests): `python -m jobs.bench --simulate dalle2 | --tiny | --rerank | --memory | --plan`.

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

STAGES_ALL = ("text_encoder", "prior", "decoder", "reranker", "upsampler_256", "upsampler_1024")


def _config(*sets: str, preset: str = "tiny", config_path: str | None = None):
    from pipeline.config import load_config

    return load_config(config_path, list(sets), input_path="unused", output_path="unused", preset=preset)


def _batch_sets(images: int) -> list[str]:
    return [f"stages.{name}.batch_size={images}" for name in STAGES_ALL]


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


def simulate(args) -> dict:
    from pipeline import simulation
    from pipeline.costs import profile_costs
    from pipeline.plan import plan_placements, stage_specs

    config = _config(*_batch_sets(args.batch_images))
    stages = stage_specs(config)
    image_costs = profile_costs(args.simulate)
    total = sum(image_costs[s.name] * s.images_per_row for s in stages)
    # Simulated seconds per real GPU-second, so the ideal run lasts --ideal-seconds.
    scale = args.ideal_seconds * args.gpus / (args.prompts * total)
    row_seconds = {s.name: image_costs[s.name] * s.images_per_row * scale for s in stages}
    _init_ray(args.gpus)
    import ray

    cpus = ray.cluster_resources()["CPU"]
    plan = plan_placements(config, stages, cpus, args.gpus, image_costs, rows=args.prompts)
    print(plan.table())
    locks = tempfile.mkdtemp(prefix="simgpu-")
    results = {}
    started = time.time()
    results["pipeline"] = simulation.run_pipeline(config, stages, plan, row_seconds, args.prompts, locks)
    default_rows = max(args.gpus * 10, args.prompts // args.default_fraction)
    results["ray_data_default"] = simulation.run_ray_data_default(stages, row_seconds, default_rows, args.gpus,
                                                                  plan.placements["decoder"].batch_rows, locks)
    results["data_parallel"] = simulation.run_data_parallel(row_seconds, args.prompts, args.gpus,
                                                            plan.placements["decoder"].batch_rows, locks)
    elapsed = time.time() - started
    rows = [("schedule", "prompts", "span s", "throughput (sim rows/s)", "bound", "efficiency")]
    for name, m in results.items():
        rows.append((name, m.rows, m.span_s, m.throughput, m.bound, m.efficiency))
    _print_rows(f"--simulate {args.simulate}: {args.gpus} simulated GPUs, time scale {scale:.4f} "
                f"(1 simulated s = {1 / scale:.2f} GPU-s); {elapsed:.0f}s of benchmarking", rows)
    ours = results["pipeline"]
    return {
        "mode": "simulate", "profile": args.simulate, "gpus": args.gpus, "prompts": args.prompts,
        "efficiency": ours.efficiency, "throughput": ours.throughput, "bound": ours.bound,
        "throughput_real_rows_per_s": round(ours.throughput * scale, 4), "time_scale": scale,
        "predicted_efficiency": round(plan.predicted / plan.bound, 4),
        "plan": {n: vars(p) for n, p in plan.placements.items()},
        "baselines": {name: {"efficiency": m.efficiency, "throughput": m.throughput, "prompts": m.rows}
                      for name, m in results.items() if name != "pipeline"},
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
    from pipeline import simulation
    from pipeline.plan import plan_placements, stage_specs

    config = _config(*_batch_sets(args.memory_batch))
    stages = stage_specs(config)
    _init_ray(args.gpus)
    import ray

    plan = plan_placements(config, stages, ray.cluster_resources()["CPU"], args.gpus,
                           {s.name: 1.0 for s in stages}, rows=args.prompts)
    row_seconds = {s.name: 0.0 for s in stages}
    locks = tempfile.mkdtemp(prefix="simgpu-")
    figures = {}
    for rows in sorted({args.prompts // 10, args.prompts}):
        started = time.time()
        measured, before, peak = _peak_rss_during(
            lambda rows=rows: simulation.run_pipeline(config, stages, plan, row_seconds, rows, locks,
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
    from pipeline.local import prompt_batch, run_stages
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
    from pipeline.reference import Reference

    workdir = tempfile.mkdtemp(prefix="bench-tiny-")
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [f"a benchmark prompt number {i}" for i in range(args.tiny_prompts)]
    pq.write_table(pa.table({"prompt": prompts}), os.path.join(workdir, "prompts.parquet"))
    sets = _batch_sets(args.batch_images) + ["models.clip=null", "output.mode=overwrite"]
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
    batch = args.batch_images

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
    from pipeline.plan import plan_placements, stage_specs

    config = _config(preset=args.preset, config_path=args.config, *args.overrides)
    stages = stage_specs(config)
    if args.calibrate:
        image_costs, source = costs.calibrate(config), "calibrated on this machine"
    elif args.profile:
        image_costs, source = costs.profile_costs(args.profile), f"profile {args.profile}"
    else:
        image_costs, source = costs.estimated_costs(config), "FLOPs estimate from the checkpoints' configs"
    gpus = args.gpus
    plan = plan_placements(config, stages, max(8, 4 * gpus), gpus, image_costs, rows=args.prompts)
    print(f"plan for {gpus} GPU(s), {args.prompts} prompts, costs: {source}")
    print(plan.table())
    print("\npin it with:")
    for name, p in plan.placements.items():
        print(f"  --set stages.{name}.replicas={p.replicas} --set stages.{name}.num_gpus={p.num_gpus}")
    return {"mode": "plan", "gpus": gpus, "costs": image_costs, "bound": plan.bound, "predicted": plan.predicted,
            "plan": {n: vars(p) for n, p in plan.placements.items()}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--simulate", metavar="PROFILE", choices=["dalle2"], help="scheduling benchmark, no models")
    mode.add_argument("--tiny", action="store_true", help="real tiny models vs a diffusers loop on this machine")
    mode.add_argument("--rerank", action="store_true", help="upsampler work per kept image by rerank.at")
    mode.add_argument("--memory", action="store_true", help="driver peak RSS for a simulated run of --prompts")
    mode.add_argument("--plan", action="store_true", help="print the placement plan and its predicted bound")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--ideal-seconds", type=float, default=120.0,
                        help="--simulate: length of a perfectly balanced run (sets the time scale)")
    parser.add_argument("--batch-images", type=int, default=4, help="images per forward pass in every stage")
    parser.add_argument("--default-fraction", type=int, default=8,
                        help="--simulate: ray_data_default runs on prompts / this (it is slow)")
    parser.add_argument("--memory-batch", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--rerank-prompts", type=int, default=4)
    parser.add_argument("--tiny-prompts", type=int, default=24)
    parser.add_argument("--profile", choices=["dalle2"], help="--plan: use a cost profile instead of the checkpoints")
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
