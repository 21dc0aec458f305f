"""Measured stage costs: the real actors in this process at two batch sizes, fitted to t(b) = a + b*c.

    python -m benchmarks.calibrate --config run.yaml --out profile.json   # then --profile profile.json

The result is a `pipeline.costs.CostProfile` in the same terms as the FLOPs model (per-batch overhead, seconds
per image, weights, activations per image), and `--out` writes it in the JSON profile format `load_profile` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from actors.base import StageContext
from pipeline.config import Config, load_config
from pipeline.costs import GIB, GPU_KINDS, STAGE_NAMES, CostProfile, GpuKind, StageCost, gpu_kind, save_profile

DEFAULT_BATCHES = (1, 4)

# Device-name fragments (torch.cuda.get_device_name) -> GpuKind; the first match wins ("l40s" before "l4").
DEVICE_NAMES = (("h200", "h200"), ("h100", "h100-80gb"), ("l40s", "l40s"), ("a10g", "a10g"), ("l4", "l4"),
                ("t4", "t4"))


def detect_gpu() -> GpuKind | None:
    """The GpuKind of this machine's first CUDA device; None without CUDA or for a device not in GPU_KINDS."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower()
    if "a100" in name:  # one name for both sizes: tell them apart by memory
        memory = torch.cuda.get_device_properties(0).total_memory / GIB
        return GPU_KINDS["a100-80gb" if memory > 48 else "a100-40gb"]
    return next((GPU_KINDS[kind] for fragment, kind in DEVICE_NAMES if fragment in name), None)


def calibration_config(config: Config, images: int) -> Config:
    """The run's config with every stage batching `images` and one candidate per prompt (every stage then sees
    exactly the images of the prompts it is given, in one forward chunk)."""
    stages = dataclasses.replace(config.stages, **{
        name: dataclasses.replace(getattr(config.stages, name), batch_size=images) for name in STAGE_NAMES})
    return dataclasses.replace(config, stages=stages, rerank=dataclasses.replace(config.rerank, candidates=1, keep=1))


def calibrate(config: Config, batches: tuple[int, int] = DEFAULT_BATCHES, repeats: int = 2,
              gpu: GpuKind | None = None) -> CostProfile:
    """Each stage's actor, in this process on this machine's device, timed (best of `repeats` after a warm-up)
    at two batch sizes; a and c fit the two times, activations per image fit the two peaks of CUDA memory above
    what the stage held before its batch, weights are what loading the actor allocated.

    `gpu` names the kind the numbers are stated on (default: the detected one). On a machine without CUDA the
    times are CPU times and memory is not measured; the profile's GPU is then a 'cpu' kind that `on()` refuses.
    """
    import torch

    from benchmarks.local import prompt_batch
    from pipeline.plan import stage_specs

    small, large = sorted(batches)
    if not 1 <= small < large:
        raise ValueError(f"calibrate needs two different batch sizes >= 1, got {batches}")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    kind = gpu or detect_gpu() or GpuKind("cpu" if not cuda else device.lower().replace(" ", "-"),
                                          memory_gb=torch.cuda.get_device_properties(0).total_memory / GIB
                                          if cuda else 0.0, tflops=0.0)
    # Actors are built once at the larger batch; the smaller batch is then one smaller forward chunk.
    run_config = calibration_config(config, large)
    specs = stage_specs(run_config)
    actors, weights = {}, {}
    for spec in specs:
        before = _allocated(cuda)
        actors[spec.name] = spec.actor_class()(StageContext(config=run_config, use_gpu=True,
                                                            final_image=spec.final_image, options=spec.options))
        weights[spec.name] = (_allocated(cuda) - before) / GIB
    seconds = {spec.name: {} for spec in specs}
    peaks = {spec.name: {} for spec in specs}
    for images in (small, large):
        batch = prompt_batch([f"a calibration prompt number {i}" for i in range(images)],
                             np.arange(images).reshape(images, 1))
        for attempt in range(repeats + 1):  # the first pass warms kernels, caches and the allocator up
            rows = dict(batch)
            for spec in specs:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                held = _allocated(cuda)
                started = time.perf_counter()
                rows = actors[spec.name](rows)
                if cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
                if attempt:
                    seconds[spec.name][images] = min(seconds[spec.name].get(images, float("inf")), elapsed)
                    peak = (torch.cuda.max_memory_allocated() - held) / GIB if cuda else 0.0
                    peaks[spec.name][images] = max(peaks[spec.name].get(images, 0.0), peak)
    stages = {name: _fit(seconds[name], peaks[name], weights[name], small, large) for name in seconds}
    return CostProfile(kind, stages, f"calibrated: the actors on {device} at batches {small} and {large}, "
                                     f"best of {repeats}")


def _allocated(cuda: bool) -> int:
    import torch

    return torch.cuda.memory_allocated() if cuda else 0


def _fit(seconds: dict[int, float], peaks: dict[int, float], weights_gb: float, small: int, large: int) -> StageCost:
    per_image = (seconds[large] - seconds[small]) / (large - small)
    if per_image <= 0:  # timing noise swamped the batch's growth: all of it counts per image
        per_image = seconds[large] / large
    overhead = max(0.0, seconds[small] - small * per_image)
    activation = max(0.0, (peaks[large] - peaks[small]) / (large - small))
    return StageCost(seconds_per_image=per_image, batch_overhead_s=overhead, weights_gb=max(0.0, weights_gb),
                     activation_gb_per_image=activation)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config YAML (its models, steps, guidance and dtypes are calibrated)")
    parser.add_argument("--preset", default=None, help="config preset, e.g. tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batches", type=int, nargs=2, default=list(DEFAULT_BATCHES), metavar=("SMALL", "LARGE"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu", choices=sorted(GPU_KINDS), help="GPU kind to state the profile on (default: detected)")
    parser.add_argument("--out", help="write the profile as JSON here")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides, input_path="unused", output_path="unused", preset=args.preset)
    profile = calibrate(config, tuple(args.batches), args.repeats, gpu_kind(args.gpu) if args.gpu else None)
    print(profile.table({name: args.batches[1] for name in profile.stages}))
    if args.out:
        save_profile(profile, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
