"""Planning: the stage list as data, and each stage's actor-pool placement (replicas, GPU and CPU shares, batches)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.config import Config, ConfigError

# Relative cost of one forward pass per image and step, by stage: a rough prior for `auto` placement
# (Karlo sizes: text encoder 123M, prior 1B, decoder 3.5B-class UNet at 64px, super-res at 256px,
# x4 upscaler at 256px latents). `python -m jobs.bench --plan` shows what it implies.
STEP_COST = {"text_encoder": 0.5, "prior": 1.0, "decoder": 6.0, "upsampler_256": 8.0, "upsampler_1024": 12.0,
             "reranker": 1.0}
GPU_GRANULARITY = 0.01
TASK_CPUS_RESERVED = 1.0
MIN_CPU_SHARE = 0.05


def task_cpus(cluster_cpus: float) -> float:
    """CPUs each read or write task asks for: a share of the reserved CPU on small machines, else one."""
    return 1.0 if cluster_cpus >= 8 else TASK_CPUS_RESERVED / 4


@dataclass
class StageSpec:
    """One stage of the run: which actor, how many images per row reach it, and its wiring."""

    name: str
    images_per_row: int
    """Images each row carries into this stage (1 for the per-prompt text encoder)."""
    final_image: bool = False
    options: dict = field(default_factory=dict)

    def actor_class(self):
        from actors import decoder, prior, reranker, text_encoder, upsampler_256, upsampler_1024

        return {"text_encoder": text_encoder.TextEncoderActor, "prior": prior.PriorActor,
                "decoder": decoder.DecoderActor, "upsampler_256": upsampler_256.Upsampler256Actor,
                "upsampler_1024": upsampler_1024.Upsampler1024Actor, "reranker": reranker.RerankerActor}[self.name]


def stage_specs(config: Config) -> list[StageSpec]:
    """The ordered stages of a run, derived from the config (reranker position, whether 1024 runs)."""
    n, k = config.rerank.candidates, config.rerank.keep
    has_1024 = config.models.upsampler_1024 is not None
    rerank = config.models.clip is not None
    after_256 = "image_256" if has_1024 else "image"
    stages = [StageSpec("text_encoder", 1), StageSpec("prior", n), StageSpec("decoder", n)]
    if rerank and config.rerank.at == "decoder":
        stages.append(StageSpec("reranker", n, options={"column": "image_64"}))
    per_row = k if rerank and config.rerank.at == "decoder" else n
    stages.append(StageSpec("upsampler_256", per_row, final_image=not has_1024))
    if rerank and config.rerank.at == "upsampler_256":
        stages.append(StageSpec("reranker", n, options={"column": after_256}))
        per_row = k
    if has_1024:
        stages.append(StageSpec("upsampler_1024", per_row, final_image=True))
    return stages


def image_cost(config: Config, stage: StageSpec) -> float:
    """Relative GPU cost of one image through a stage (per row for the text encoder)."""
    settings = getattr(config.stages, stage.name)
    steps = getattr(settings, "steps", 1)
    guidance = 2 if getattr(settings, "guidance_scale", 0) > 1 else 1
    best_of = config.prior.best_of if stage.name == "prior" else 1
    return STEP_COST[stage.name] * steps * guidance * best_of


@dataclass
class Placement:
    """Actor-pool settings of one stage."""

    replicas: int
    num_gpus: float
    num_cpus: float
    batch_rows: int
    """Rows per Ray Data batch: stage batch_size (images) over the images each row carries."""
    threads: int
    """torch intra-op threads per actor when computing on CPU."""


def plan_placements(config: Config, stages: list[StageSpec], cluster_cpus: float, cluster_gpus: float,
                    costs: dict[str, float] | None = None) -> dict[str, Placement]:
    """Replicas and resource shares per stage; `auto` entries follow stage costs (GPU-seconds per row)."""
    costs = costs or {s.name: image_cost(config, s) * s.images_per_row for s in stages}
    settings = {s.name: getattr(config.stages, s.name) for s in stages}
    gpus = {}
    replicas = {}
    if cluster_gpus >= 1:
        gpus, replicas = _share_gpus(settings, costs, int(cluster_gpus))
    else:
        for name, stage in settings.items():
            replicas[name] = 1 if stage.replicas == "auto" else stage.replicas
            gpus[name] = 0.0
    actors = sum(replicas.values())
    # Keep one CPU for Ray Data's own tasks (file listing asks for a whole CPU, then reads and writes),
    # or a small machine deadlocks with every CPU held by an idle actor.
    cpu_share = min(1.0, max(MIN_CPU_SHARE, (cluster_cpus - TASK_CPUS_RESERVED) / actors))
    threads = max(1, int(cluster_cpus // max(1, actors))) if cluster_gpus < 1 else 1
    placements = {}
    for stage in stages:
        s = settings[stage.name]
        placements[stage.name] = Placement(
            replicas=replicas[stage.name], num_gpus=gpus[stage.name],
            # Rounded down: shares that sum past the reserve would starve the listing task again.
            num_cpus=s.num_cpus if s.num_cpus is not None else math.floor(cpu_share * 100) / 100,
            batch_rows=max(1, s.batch_size // stage.images_per_row), threads=threads,
        )
    return placements


def _share_gpus(settings: dict, costs: dict[str, float], gpus: int) -> tuple[dict[str, float], dict[str, int]]:
    fixed = {n: s for n, s in settings.items() if s.num_gpus != "auto" and s.replicas != "auto"}
    reserved = sum(s.num_gpus * s.replicas for s in fixed.values())
    if reserved > gpus + 1e-9:
        raise ConfigError(f"stages ask for {reserved:g} GPUs (num_gpus x replicas) but the cluster has {gpus}; "
                          "lower stages.<stage>.num_gpus or replicas, or set them to auto")
    auto = {n: s for n, s in settings.items() if n not in fixed}
    total_cost = sum(costs[n] for n in auto) or 1.0
    free = gpus - reserved
    # Fractional actors cannot span GPUs, so ideal shares may not pack; shrink them until they do.
    scale = 1.0
    for _ in range(60):
        share_gpus, share_replicas = _auto_shares(auto, costs, total_cost, free * scale)
        share_gpus.update({n: float(s.num_gpus) for n, s in fixed.items()})
        share_replicas.update({n: s.replicas for n, s in fixed.items()})
        if _packs(share_gpus, share_replicas, gpus):
            return share_gpus, share_replicas
        scale *= 0.97
    raise ConfigError(_packing_message(share_gpus, share_replicas, gpus))


def _auto_shares(auto: dict, costs: dict[str, float], total_cost: float, free: float):
    share_gpus, share_replicas = {}, {}
    for name, s in auto.items():
        share = free * costs[name] / total_cost
        if s.replicas == "auto" and s.num_gpus == "auto":
            count = max(1, math.floor(share)) if share >= 1 else 1
            fraction = 1.0 if share >= 1 else share
        elif s.replicas == "auto":
            fraction = float(s.num_gpus)
            count = max(1, math.floor(share / fraction)) if fraction > 0 else 1
        else:
            count = s.replicas
            fraction = min(1.0, share / count)
        share_replicas[name] = count
        share_gpus[name] = max(GPU_GRANULARITY, math.floor(fraction / GPU_GRANULARITY) * GPU_GRANULARITY)
    return share_gpus, share_replicas


def _packs(fractions: dict[str, float], replicas: dict[str, int], gpus: int) -> bool:
    """First-fit decreasing, as Ray places them: whole-GPU actors take whole GPUs, a fraction fits on one GPU."""
    bins = [1.0] * gpus
    for size in sorted((f for n, f in fractions.items() for _ in range(replicas[n])), reverse=True):
        if size >= 1:
            need = math.ceil(size - 1e-9)
            free = [i for i, b in enumerate(bins) if b >= 1 - 1e-9][:need]
            if len(free) < need:
                return False
            for i in free:
                bins[i] = 0.0
            continue
        for i, b in enumerate(bins):
            if b + 1e-9 >= size:
                bins[i] -= size
                break
        else:
            return False
    return True


def _packing_message(fractions, replicas, gpus) -> str:
    asked = ", ".join(f"{n} {replicas[n]}x{fractions[n]:g}" for n in fractions)
    return (f"stage actors ({asked}) do not fit on {gpus} GPU(s); lower stages.<stage>.num_gpus or replicas, "
            "or set them to auto")
