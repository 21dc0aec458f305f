"""Planning: the stage list as data, and each stage's actor-pool placement (replicas, GPU and CPU shares, batches)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from pipeline.config import Config, ConfigError

GPU_GRANULARITY = 0.001
REPLICA_OPTIONS = 5
"""Replica counts tried per auto stage, from the fewest that can carry its share upwards."""
SMALL_SHARE = 0.1
"""A stage needing less than this many GPUs gets one actor."""
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


@dataclass
class Plan:
    """Placements plus what they predict."""

    placements: dict[str, Placement]
    row_costs: dict[str, float]
    """GPU-seconds per row of each stage (per image x images per row)."""
    gpus: float
    bound: float | None = None
    """Rows/s no schedule can beat on these GPUs: G / sum of row costs."""
    predicted: float | None = None
    """Rows/s this plan should reach on `rows` rows: its slowest stage, plus the pipeline's drain time."""

    def table(self) -> str:
        lines = [f"{'stage':16s} {'GPU-s/row':>10s} {'replicas':>8s} {'num_gpus':>8s} {'GPUs':>6s} "
                 f"{'rows/s':>8s} {'batch':>6s}"]
        for name, p in self.placements.items():
            cost = self.row_costs.get(name, 0.0)
            rate = p.replicas * p.num_gpus / cost if cost and p.num_gpus else float("nan")
            lines.append(f"{name:16s} {cost:10.4f} {p.replicas:8d} {p.num_gpus:8.3f} {p.replicas * p.num_gpus:6.2f} "
                         f"{rate:8.3f} {p.batch_rows:6d}")
        if self.bound:
            lines.append(f"bound {self.bound:.3f} rows/s on {self.gpus:g} GPUs; plan predicts {self.predicted:.3f} "
                         f"rows/s ({self.predicted / self.bound:.1%} of the bound)")
        return "\n".join(lines)


def plan_placements(config: Config, stages: list[StageSpec], cluster_cpus: float, cluster_gpus: float,
                    image_costs: dict[str, float] | None = None, rows: int = 10_000,
                    cpus_per_gpu: float | None = None) -> Plan:
    """Replicas, GPU fractions and batches per stage.

    With GPUs, `auto` stages share them by cost: the search tries replica counts per stage, gives each
    stage the GPU fraction its share needs, keeps only layouts that Ray can place (fractional actors are
    packed best-fit in pool order and cannot span GPUs), and picks the one predicted to finish `rows` soonest
    (slowest stage, plus the drain time of batches still in the pipeline). Without GPUs, no stage asks for one.
    A GPU actor asks for CPUs in proportion to its GPU share (`cpus_per_gpu`: the fewest CPUs per GPU on any
    GPU node), so wherever its GPU share fits, its CPUs fit too, with some left for read and write tasks.
    """
    settings = {s.name: getattr(config.stages, s.name) for s in stages}
    batch_rows = {s.name: max(1, settings[s.name].batch_size // s.images_per_row) for s in stages}
    image_costs = image_costs or {s.name: 1.0 for s in stages}
    row_costs = {s.name: image_costs.get(s.name, 0.0) * s.images_per_row for s in stages}
    bound = predicted = None
    if cluster_gpus >= 1:
        gpus_of, replicas = _search(stages, settings, row_costs, batch_rows, int(cluster_gpus), rows)
        total = sum(row_costs.values())
        bound = int(cluster_gpus) / total if total else None
        predicted = _predicted_rate(gpus_of, replicas, row_costs, batch_rows, rows)
    else:
        replicas = {n: 1 if s.replicas == "auto" else s.replicas for n, s in settings.items()}
        gpus_of = {n: 0.0 for n in settings}
    actors = sum(replicas.values())
    # Keep one CPU for Ray Data's own tasks (file listing asks for a whole CPU, then reads and writes),
    # or a small machine deadlocks with every CPU held by an idle actor.
    cpu_share = min(1.0, max(MIN_CPU_SHARE, (cluster_cpus - TASK_CPUS_RESERVED) / actors))
    threads = max(1, int(cluster_cpus // max(1, actors))) if cluster_gpus < 1 else 1
    per_gpu = cpus_per_gpu if cpus_per_gpu is not None else cluster_cpus / max(1.0, cluster_gpus)
    per_gpu_for_actors = max(0.0, per_gpu - min(TASK_CPUS_RESERVED, per_gpu / 4))
    placements = {}
    for stage in stages:
        s = settings[stage.name]
        share = cpu_share if gpus_of[stage.name] == 0 else min(1.0, gpus_of[stage.name] * per_gpu_for_actors)
        placements[stage.name] = Placement(
            replicas=replicas[stage.name], num_gpus=gpus_of[stage.name],
            # Rounded down: shares that sum past the reserve would starve the listing task again.
            num_cpus=s.num_cpus if s.num_cpus is not None else max(MIN_CPU_SHARE, math.floor(share * 100) / 100),
            batch_rows=batch_rows[stage.name], threads=threads,
        )
    return Plan(placements=placements, row_costs=row_costs, gpus=cluster_gpus, bound=bound, predicted=predicted)


def _predicted_rate(gpus_of, replicas, row_costs, batch_rows, rows) -> float:
    steady = min(replicas[n] * gpus_of[n] / c for n, c in row_costs.items() if c > 0)
    drain = sum(batch_rows[n] * c / gpus_of[n] for n, c in row_costs.items() if c > 0)
    return rows / (rows / steady + drain)


def _search(stages, settings, row_costs, batch_rows, gpus: int, rows: int):
    order = [s.name for s in stages]
    total = sum(row_costs.values()) or 1.0
    best_rate = len(order) and gpus / total  # rows/s if every GPU-second went to useful work
    fixed_gpus = sum(s.num_gpus * s.replicas for s in settings.values()
                     if s.num_gpus != "auto" and s.replicas != "auto")
    if fixed_gpus > gpus + 1e-9:
        raise ConfigError(f"stages ask for {fixed_gpus:g} GPUs (num_gpus x replicas) but the cluster has {gpus}; "
                          "lower stages.<stage>.num_gpus or replicas, or set them to auto")

    def options(name):
        s = settings[name]
        if s.replicas != "auto":
            return [s.replicas]
        if s.num_gpus != "auto":
            return [None]  # derived from the rate: as many fixed-size actors as the share needs
        need = best_rate * row_costs[name]
        if need < SMALL_SHARE:
            return [1]  # a sliver of one GPU: more actors would only add model copies
        first = max(1, math.ceil(need - 1e-9))
        # The fewest actors that can carry the share, a few more, and many small ones that fill the gaps
        # whole-GPU-sized actors leave behind.
        counts = set(range(first, first + REPLICA_OPTIONS)) | {gpus, 2 * gpus}
        return sorted(c for c in counts if first <= c <= 4 * gpus)

    # Best-first: rank replica combinations by what they could reach if packing cost nothing, then find
    # the real (placeable) rate of each, stopping once no remaining combination could beat the best found.
    ranked = []
    for combo in itertools.product(*(options(n) for n in order)):
        counts = dict(zip(order, combo))
        optimistic = _optimistic_rate(order, settings, row_costs, counts, batch_rows, best_rate, rows)
        if optimistic is not None:
            ranked.append((-optimistic, sum(c or 0 for c in combo), counts))
    ranked.sort(key=lambda item: item[:2])
    best = None
    for negative_bound, _, counts in ranked:
        if best is not None and -negative_bound <= best[0][0] * -1 + 1e-12:
            break
        layout = _largest_feasible(order, settings, row_costs, counts, gpus, best_rate)
        if layout is None:
            continue
        gpus_of, replicas = layout
        rate = _predicted_rate(gpus_of, replicas, row_costs, batch_rows, rows)
        key = (-rate, sum(replicas.values()))
        if best is None or key < best[0]:
            best = (key, gpus_of, replicas)
    if best is None:
        raise ConfigError(f"the stage settings cannot be placed on {gpus} GPU(s) (each fractional actor must fit on "
                          "one GPU); lower stages.<stage>.num_gpus or replicas, or set them to auto")
    return best[1], best[2]


def _optimistic_rate(order, settings, row_costs, counts, batch_rows, best_rate, rows):
    """An upper bound on what a replica combination can predict (fractions capped at one GPU, no packing)."""
    layout = _layout_at(best_rate, order, settings, row_costs, counts, cap=True)
    return None if layout is None else _predicted_rate(*layout, row_costs, batch_rows, rows)


def _layout_at(rate, order, settings, row_costs, counts, cap: bool = False):
    gpus_of, replicas = {}, {}
    for name in order:
        s = settings[name]
        need = rate * row_costs[name]  # GPUs the stage needs to carry `rate` rows/s
        if s.num_gpus != "auto" and s.replicas != "auto":
            gpus_of[name], replicas[name] = float(s.num_gpus), s.replicas
        elif s.num_gpus != "auto":
            gpus_of[name] = float(s.num_gpus)
            replicas[name] = max(1, math.ceil(need / gpus_of[name] - 1e-9)) if gpus_of[name] > 0 else 1
        else:
            replicas[name] = counts[name]
            fraction = math.ceil(need / counts[name] / GPU_GRANULARITY - 1e-9) * GPU_GRANULARITY
            if fraction > 1:
                if not cap:
                    return None
                fraction = 1.0
            gpus_of[name] = max(GPU_GRANULARITY, fraction)
    return gpus_of, replicas


def _largest_feasible(order, settings, row_costs, counts, gpus, best_rate):
    """The layout for these replica counts at the highest rate that still places; None if none does."""

    def at(rate):
        layout = _layout_at(rate, order, settings, row_costs, counts)
        return layout if layout is not None and _places(layout, order, gpus) else None

    found = at(best_rate)
    low, high = 0.0, best_rate
    for _ in range(0 if found else 16):
        middle = (low + high) / 2
        layout = at(middle)
        if layout is not None:
            found, low = layout, middle
        else:
            high = middle
    return found


def _places(layout, order, gpus: int) -> bool:
    """Can Ray place every actor? Checked best-fit (as Ray assigns fractional GPUs) in pool order and reversed."""
    gpus_of, replicas = layout
    items = [gpus_of[n] for n in order for _ in range(replicas[n]) if gpus_of[n] > 0]
    return _best_fit(items, gpus) and _best_fit(items[::-1], gpus)


def _best_fit(items: list[float], gpus: int) -> bool:
    free = [1.0] * gpus
    for size in items:
        if size >= 1 - 1e-9:
            whole = math.ceil(size - 1e-9)
            empty = [i for i, f in enumerate(free) if f >= 1 - 1e-9][:whole]
            if len(empty) < whole:
                return False
            for i in empty:
                free[i] = 0.0
            continue
        fits = [(f, i) for i, f in enumerate(free) if f + 1e-9 >= size]
        if not fits:
            return False
        _, i = min(fits)
        free[i] -= size
    return True
