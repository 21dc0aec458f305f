"""Planning: the stage list as data, and where each stage's actors go (GPU bundles, GPU shares, batches)."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from actors.registry import STAGE_ACTORS
from pipeline.config import Config, ConfigError
from pipeline.costs import CUDA_CONTEXT_GB, StageCost

GPU_GRANULARITY = 0.001
MEMORY_MARGIN = 0.9
"""Share of a GPU's memory a layout may plan to fill: the allocator's fragmentation and cuDNN/cuBLAS
workspaces take the rest."""
OVERHEAD_SHARE = 0.05
"""batch_size 'auto' with memory figures: the smallest batch whose per-batch overhead is at most this share
of the batch's time (larger batches only cost memory and pipeline latency)."""
MAX_AUTO_BATCH = 64
COUPLING_LOSS = 0.03
"""What GPUs of different groups lose waiting on each other's queues, beyond the slowest group's rate (the
event model of the pipeline, benchmarks/event_model.py, puts it at 2-4%); co-located GPUs run the whole
chain each and lose none of it, so a layout with several groups must beat them by more than this."""
TASK_CPUS_RESERVED = 1.0
ACTOR_CPUS_PER_GPU = 2.0
"""CPUs reserved with each GPU for its actors: they feed the GPU one at a time, so more would only take CPUs
from the read, encode and write tasks."""
MIN_CPU_SHARE = 0.01


def task_cpus(cluster_cpus: float) -> float:
    """CPUs each read or write task asks for: a share of the reserved CPU on small machines, else one."""
    return 1.0 if cluster_cpus >= 8 else TASK_CPUS_RESERVED / 4


def bundle_cpus(cluster: ClusterShape) -> float:
    """CPUs reserved with each GPU for the actors on it; the rest of its node's CPUs stay free for read and
    write tasks."""
    per_gpu = cluster.cpus_per_gpu if cluster.cpus_per_gpu is not None else cluster.cpus / max(1, cluster.gpus)
    free = per_gpu - min(TASK_CPUS_RESERVED, per_gpu / 4)
    return max(MIN_CPU_SHARE, math.floor(min(ACTOR_CPUS_PER_GPU, free) * 100) / 100)


@dataclass
class StageSpec:
    """One stage of the run: which actor, how many images per row reach it, and its wiring."""

    name: str
    images_per_row: int
    """Images each row carries into this stage (1 for the per-prompt text encoder)."""
    final_image: bool = False
    options: dict = field(default_factory=dict)

    def actor_class(self):
        return STAGE_ACTORS[self.name]


def stage_specs(config: Config, has_prompts: bool = True) -> list[StageSpec]:
    """The ordered stages of a run, derived from the config (mode, reranker position, whether 1024 runs).
    Without prompts (a variation input with no prompt column) candidates are scored against their source image."""
    n, k = config.images_per_row, config.rerank.keep
    has_1024 = config.models.upsampler_1024 is not None
    rerank = config.reranks
    after_256 = "image_256" if has_1024 else "image"
    # Variations without captions: scored by likeness to their source image; keep == candidates keeps them all.
    by = {} if has_prompts else {"by": "source"}
    if config.image_mode:
        stages = [StageSpec("image_encoder", 1), StageSpec("decoder", n)]
    else:
        stages = [StageSpec("text_encoder", 1), StageSpec("prior", n), StageSpec("decoder", n)]
    if rerank and config.rerank.at == "decoder":
        stages.append(StageSpec("reranker", n, options={"column": "image_64", **by}))
    per_row = k if rerank and config.rerank.at == "decoder" else n
    stages.append(StageSpec("upsampler_256", per_row, final_image=not has_1024))
    if rerank and config.rerank.at == "upsampler_256":
        stages.append(StageSpec("reranker", n, options={"column": after_256, **by}))
        per_row = k
    if has_1024:
        stages.append(StageSpec("upsampler_1024", per_row, final_image=True))
    return stages


@dataclass(frozen=True)
class ClusterShape:
    """What the planner plans for."""

    cpus: float
    gpus: int
    """GPUs the run reserves (what the cluster has now, or what its autoscaler can add)."""
    cpus_per_gpu: float | None = None
    """Fewest CPUs per GPU on any GPU node type; None: spread evenly (cpus / gpus)."""
    gpu_memory_gb: float | None = None
    """Memory of one GPU; None: unknown (fake GPUs, or no figure), so memory is not checked."""


@dataclass
class Placement:
    """Actor-pool settings of one stage."""

    replicas: int
    num_gpus: float
    num_cpus: float
    batch_rows: int
    """Rows per Ray Data batch: the stage's images per forward pass over the images each row carries."""
    batch_images: int
    """Images per forward pass."""
    threads: int
    """torch intra-op threads per actor when computing on CPU."""
    bundles: list[int] = field(default_factory=list)
    """GPU bundle (index into the run's placement group) of each replica, in start order; empty on CPU."""
    memory_fraction: float | None = None
    """Share of its GPU's memory the actor may allocate; None: no cap (CPU, or GPU memory unknown)."""


@dataclass
class GpuGroup:
    """GPUs that all host one actor of each of the same stages."""

    stages: list[str]
    bundles: list[int]
    memory_gb: float
    """Planned peak memory on each of its GPUs (weights, activations at the planned batches, CUDA contexts)."""


@dataclass
class Plan:
    """Placements plus what they predict."""

    placements: dict[str, Placement]
    row_costs: dict[str, float]
    """GPU-seconds per row of each stage at its planned batch (per image x images per row)."""
    gpus: int
    layout: str = "cpu"
    """'cpu' (no GPUs), 'co-located' (every GPU hosts every stage), 'dedicated' (each stage its own GPUs),
    'mixed' (some stages share GPUs), or 'fixed' (every stage placed by its own settings)."""
    groups: list[GpuGroup] = field(default_factory=list)
    bundle_cpus: float = 0.0
    """CPUs reserved with each GPU bundle, shared by the actors on that GPU."""
    gpu_memory_gb: float | None = None
    bound: float | None = None
    """Rows/s no schedule can beat on these GPUs: G / sum of row costs."""
    predicted: float | None = None
    """Rows/s this plan should reach on `rows` rows: its slowest GPU group, plus the pipeline's drain."""

    def table(self) -> str:
        lines = [f"{'stage':16s} {'GPU-s/row':>10s} {'replicas':>8s} {'num_gpus':>8s} {'GPUs':>6s} "
                 f"{'batch':>6s} {'mem cap':>7s}"]
        for name, p in self.placements.items():
            cap = f"{p.memory_fraction:.2f}" if p.memory_fraction else "-"
            lines.append(f"{name:16s} {self.row_costs.get(name, 0.0):10.4f} {p.replicas:8d} {p.num_gpus:8.3f} "
                         f"{p.replicas * p.num_gpus:6.2f} {p.batch_images:6d} {cap:>7s}")
        memory = f" of {self.gpu_memory_gb:g} GB" if self.gpu_memory_gb else " (GPU memory unknown: not checked)"
        for group in self.groups:
            lines.append(f"GPUs {_ranges(group.bundles)}: {' + '.join(group.stages)}; "
                         f"{group.memory_gb:.1f} GB planned per GPU{memory}")
        if self.bound:
            lines.append(f"layout {self.layout}; bound {self.bound:.3f} rows/s on {self.gpus} GPUs; plan predicts "
                         f"{self.predicted:.3f} rows/s ({self.predicted / self.bound:.1%} of the bound)")
        return "\n".join(lines)

    def bundle_of_actors(self) -> dict[int, list[str]]:
        """Which stage actors each GPU bundle hosts."""
        hosted: dict[int, list[str]] = {}
        for name, p in self.placements.items():
            for bundle in p.bundles:
                hosted.setdefault(bundle, []).append(name)
        return hosted


def fused_placement(by_stage: dict[str, Placement], layout: str) -> Placement:
    """One actor pool for every stage (run.fuse_stages): each actor takes what one actor of every stage took.

    Only where every stage has the same actors on the same GPUs (a co-located plan, or CPU stages with the
    same replicas); a ConfigError otherwise."""
    placements = list(by_stage.values())
    first = placements[0]
    if any(p.replicas != first.replicas or p.bundles != first.bundles for p in placements):
        raise ConfigError(f"run.fuse_stages needs every GPU to host every stage, but this plan is {layout} ("
                          + ", ".join(f"{n}: {p.replicas} actor(s)" for n, p in by_stage.items())
                          + "); unset run.fuse_stages, or the stages' num_gpus / replicas settings that split them")
    fractions = [p.memory_fraction for p in placements]
    return Placement(replicas=first.replicas, num_gpus=min(1.0, sum(p.num_gpus for p in placements)),
                     num_cpus=sum(p.num_cpus for p in placements),
                     batch_rows=max(p.batch_rows for p in placements), batch_images=max(p.batch_images for p in placements),
                     threads=sum(p.threads for p in placements), bundles=list(first.bundles),
                     memory_fraction=min(1.0, sum(fractions)) if None not in fractions else None)


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}" if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"


def plan_placements(config: Config, stages: list[StageSpec], cluster: ClusterShape, costs: dict | None = None,
                    rows: int = 10_000) -> Plan:
    """Replicas, GPU bundles, shares and batches per stage.

    `costs` maps stage names to `pipeline.costs.StageCost` (time per batch and memory); missing stages cost
    nothing. Without GPUs no stage asks for one. With GPUs, stages whose `num_gpus` the user set are placed
    as asked, first-fit onto GPUs of their own; the other stages are split into groups that share GPUs, each
    GPU of a group hosting one actor of every stage in it, and the GPUs are shared among groups in
    proportion to their cost. One group of every stage (co-located) balances by construction and wins
    whenever the models fit on one GPU together; otherwise, or where larger batches on GPUs of their own
    pay more than the balance, several groups (dedicated or mixed) do. Every actor is pinned to its GPU
    bundle, so the layout is exactly what runs.
    """
    costs = {name: costs.get(name, StageCost()) if costs else StageCost() for name in (s.name for s in stages)}
    settings = {s.name: getattr(config.stages, s.name) for s in stages}
    if cluster.gpus < 1:
        return _plan_cpu(stages, settings, costs, cluster)
    return _Planner(stages, settings, costs, cluster, rows).plan()


def _cpu_actor_cpus(names: list[str], settings, replicas: dict[str, int], room: float,
                   preferred: float) -> dict[str, float]:
    """CPUs per actor of the stages that compute on CPU: the stage's num_cpus when set, else an equal share of
    what `room` leaves, at most `preferred`; a ConfigError when they cannot all fit in `room`."""
    fixed = {n: float(settings[n].num_cpus) for n in names if settings[n].num_cpus}
    shared = [n for n in names if n not in fixed]
    left = room - sum(fixed[n] * replicas[n] for n in fixed)
    count = sum(replicas[n] for n in shared)
    # Rounded down: shares that sum past the room would starve the read and write tasks.
    share = math.floor(min(preferred, left / count) * 100) / 100 if count else preferred
    if left < -1e-9 or share < MIN_CPU_SHARE:
        asked = sum(fixed[n] * replicas[n] for n in fixed) + MIN_CPU_SHARE * count
        raise ConfigError(f"the stages on CPU ({', '.join(names)}) need at least {asked:g} CPUs (num_cpus x "
                          f"replicas) but the cluster leaves them {max(0.0, room):g} (after the GPUs' reserved CPUs "
                          "and the read/write tasks); lower stages.<stage>.num_cpus or replicas, or use a cluster "
                          "with more CPUs")
    return {n: fixed.get(n, share) for n in names}


def _plan_cpu(stages, settings, costs, cluster: ClusterShape) -> Plan:
    replicas = {s.name: 1 if settings[s.name].replicas == "auto" else settings[s.name].replicas for s in stages}
    actors = sum(replicas.values())
    # Keep one CPU for Ray Data's own tasks (file listing asks for a whole CPU, then reads and writes),
    # or a small machine deadlocks with every CPU held by an idle actor; never less than one task's CPUs.
    preferred = min(1.0, max(0.05, (cluster.cpus - TASK_CPUS_RESERVED) / actors))
    names = [s.name for s in stages]
    cpus = _cpu_actor_cpus(names, settings, replicas, cluster.cpus - task_cpus(cluster.cpus), preferred)
    threads = max(1, int(cluster.cpus // max(1, actors)))
    placements, row_costs = {}, {}
    for s in stages:
        batch = settings[s.name].batch_images()
        row_costs[s.name] = costs[s.name].seconds_per_image_at(batch) * s.images_per_row
        placements[s.name] = Placement(
            replicas=replicas[s.name], num_gpus=0.0, num_cpus=cpus[s.name],
            batch_rows=max(1, batch // s.images_per_row), batch_images=batch, threads=threads)
    return Plan(placements=placements, row_costs=row_costs, gpus=0)


class _Planner:
    """The GPU layout search; one instance per plan."""

    def __init__(self, stages, settings, costs, cluster: ClusterShape, rows: int):
        self.stages, self.settings, self.costs, self.cluster, self.rows = stages, settings, costs, cluster, rows
        self.per_row = {s.name: s.images_per_row for s in stages}
        self.memory = cluster.gpu_memory_gb
        self.bundle_cpus = bundle_cpus(cluster)

    # ------------------------------------------------------------ costs at a batch size

    def batch_for(self, name: str, budget_gb: float | None) -> int:
        """Images per forward: the configured size, or for 'auto' the overhead-amortising size within memory."""
        setting, cost = self.settings[name], self.costs[name]
        if setting.batch_size != "auto":
            return setting.batch_size
        if budget_gb is None or cost.seconds_per_image <= 0:
            return setting.auto_batch
        wanted = math.ceil(cost.batch_overhead_s * (1 - OVERHEAD_SHARE) / (OVERHEAD_SHARE * cost.seconds_per_image))
        return max(1, min(MAX_AUTO_BATCH, wanted))

    def row_cost(self, name: str, batch: int) -> float:
        return self.costs[name].seconds_per_image_at(batch) * self.per_row[name]

    def actor_memory(self, name: str, batch: int) -> float:
        return self.costs[name].memory_gb(batch) + CUDA_CONTEXT_GB

    def fit_batches(self, names: list[str], in_step: bool = False) -> dict[str, int] | None:
        """Images per forward for stages sharing one GPU; None if they cannot fit on it together.

        Each 'auto' stage starts at the size that amortises its per-batch overhead. When every GPU hosts every
        stage, each GPU runs the whole chain and the queues between stages pace it, so the sizes may differ;
        the hungriest is halved until the group fits. When the group's output feeds GPUs of other groups
        (`in_step`), its stages move the same rows per batch instead: actors on one GPU take turns, a batch
        each, so a stage with 3-row batches among 50-row ones would get a sixteenth of their rows and starve
        the GPUs downstream; with equal rows each round of turns carries its rows through every stage. Without
        a memory figure (fake GPUs) each stage keeps its own fallback size.
        """
        if self.memory is None:
            return {n: self.batch_for(n, None) for n in names}
        budget = self.memory * MEMORY_MARGIN
        auto = [n for n in names if self.settings[n].batch_size == "auto"]
        batches = {n: self.batch_for(n, self.memory) for n in names}
        if in_step:
            rows = max((max(1, batches[n] // self.per_row[n]) for n in auto), default=1)
            batches.update({n: rows * self.per_row[n] for n in auto})
        while sum(self.actor_memory(n, b) for n, b in batches.items()) > budget:
            shrinkable = [n for n in auto if batches[n] > self.per_row[n]]
            if not shrinkable:
                return None
            if in_step:
                rows = max(1, batches[shrinkable[0]] // self.per_row[shrinkable[0]] // 2)
                batches.update({n: rows * self.per_row[n] for n in auto})
            else:
                hungriest = max(shrinkable, key=lambda n: self.costs[n].activation_gb_per_image * batches[n])
                batches[hungriest] = max(self.per_row[hungriest], batches[hungriest] // 2)
        return batches

    # ------------------------------------------------------------ the plan

    def plan(self) -> Plan:
        gpu_stages = [s.name for s in self.stages if self.settings[s.name].num_gpus != 0]
        cpu_stages = [s.name for s in self.stages if self.settings[s.name].num_gpus == 0]
        pinned = [n for n in gpu_stages if self.settings[n].num_gpus != "auto" or self.settings[n].replicas != "auto"]
        auto = [n for n in gpu_stages if n not in pinned]
        batches = {n: self.batch_for(n, None) for n in cpu_stages}
        slots: dict[int, list[tuple[str, float]]] = {}
        placed_bundles = self._place_pinned(pinned, auto, batches, slots)
        free = self.cluster.gpus - placed_bundles
        groups: list[GpuGroup] = []
        if auto:
            if free < 1:
                raise ConfigError(f"the stages with fixed num_gpus/replicas take all {self.cluster.gpus} GPU(s) and "
                                  f"leave none for {', '.join(auto)}; lower their replicas or set them to auto")
            partition, counts, group_batches = self._best_partition(auto, free)
            batches.update(group_batches)
            next_bundle = placed_bundles
            for stages_in, count in zip(partition, counts):
                bundles = list(range(next_bundle, next_bundle + count))
                next_bundle += count
                shares = self._shares(stages_in, batches)
                for bundle in bundles:
                    slots[bundle] = [(n, shares[n]) for n in stages_in]
                groups.append(GpuGroup(stages_in, bundles, sum(self.actor_memory(n, batches[n]) for n in stages_in)))
        return self._assemble(groups, slots, batches, cpu_stages, pinned, auto)

    def _place_pinned(self, pinned, auto, batches, slots) -> int:
        """First-fit (largest share first) of the user-placed stages' actors onto GPUs of their own."""
        if not pinned:
            return 0
        total = sum(self.row_cost(n, self.batch_for(n, self.memory)) for n in pinned + auto)
        rate = self.cluster.gpus / total if total else 0.0  # rows/s were every GPU-second useful
        actors = []
        for name in pinned:
            s = self.settings[name]
            batches[name] = self.batch_for(name, self.memory)
            need = rate * self.row_cost(name, batches[name])  # GPUs the stage needs to keep up
            if s.num_gpus != "auto":
                share = float(s.num_gpus)
                count = s.replicas if s.replicas != "auto" else max(1, math.ceil(need / share - 1e-9))
            else:
                count = s.replicas
                share = min(1.0, max(GPU_GRANULARITY, math.ceil(need / count / GPU_GRANULARITY) * GPU_GRANULARITY))
            actors += [(share, name)] * count
        asked = sum(share for share, _ in actors)
        if asked > self.cluster.gpus + 1e-9:
            raise ConfigError(f"stages ask for {asked:g} GPUs (num_gpus x replicas) but the run has "
                              f"{self.cluster.gpus}; lower stages.<stage>.num_gpus or replicas, or set them to auto")
        used = 0
        for share, name in sorted(actors, key=lambda a: -a[0]):
            fits = [b for b in range(used) if sum(f for _, f in slots[b]) + share <= 1 + 1e-9
                    and self._fits_memory([n for n, _ in slots[b]] + [name], batches)]
            if fits:
                slots[fits[0]].append((name, share))
                continue
            if used >= self.cluster.gpus:
                raise ConfigError(f"the fixed stage settings cannot be placed on {self.cluster.gpus} GPU(s): each "
                                  "actor must fit on one GPU beside the others; lower stages.<stage>.num_gpus or "
                                  "replicas, or set them to auto")
            if not self._fits_memory([name], batches):
                raise ConfigError(self._too_big(name, batches[name]))
            slots[used] = [(name, share)]
            used += 1
        return used

    def _fits_memory(self, names, batches) -> bool:
        return self.memory is None or (
            sum(self.actor_memory(n, batches[n]) for n in names) <= self.memory * MEMORY_MARGIN)

    def _too_big(self, name, batch) -> str:
        return (f"stage {name} needs {self.actor_memory(name, batch):.1f} GB at batch {batch} but a GPU has "
                f"{self.memory:g} GB ({MEMORY_MARGIN:.0%} usable); lower stages.{name}.batch_size, use "
                f"dtype fp16, or larger GPUs")

    def _best_partition(self, names: list[str], gpus: int):
        """The grouping of stages onto GPUs with the highest steady rate; fewer groups win ties."""
        best = None
        for partition in _set_partitions(names):
            if len(partition) > gpus:
                continue
            group_batches = {}
            for group in partition:
                fitted = self.fit_batches(group, in_step=len(partition) > 1)
                if fitted is None:
                    break
                group_batches.update(fitted)
            else:
                group_costs = [sum(self.row_cost(n, group_batches[n]) for n in group) for group in partition]
                counts = _share_gpus(group_costs, gpus)
                steady = min((c / cost for c, cost in zip(counts, group_costs) if cost > 0), default=float("inf"))
                rate = self._with_drain(steady, {n: (max(1, group_batches[n] // self.per_row[n]),
                                                     self.row_cost(n, group_batches[n])) for n in names})
                if len(partition) > 1:
                    rate *= 1 - COUPLING_LOSS
                key = (rate * (1 - 1e-9), -len(partition))
                if best is None or key > best[0]:
                    ordered = [sorted(g, key=names.index) for g in partition]
                    best = (key, ordered, counts, group_batches)
        if best is None:
            alone = [n for n in names if self.fit_batches([n]) is None]
            smallest = {n: 1 if self.settings[n].batch_size == "auto" else self.settings[n].batch_size for n in alone}
            raise ConfigError(self._too_big(alone[0], smallest[alone[0]]) if alone else
                              f"the stages cannot be placed on {gpus} GPU(s)")
        return best[1], best[2], best[3]

    def _shares(self, names, batches) -> dict[str, float]:
        """GPU fractions of co-hosted actors, in proportion to their cost (accounting only: they are pinned)."""
        costs = {n: self.row_cost(n, batches[n]) for n in names}
        total = sum(costs.values())
        steps = {n: max(1, math.floor((c / total if total else 1 / len(names)) / GPU_GRANULARITY)) for n, c in costs.items()}
        # The rounding remainder goes to the costliest stage: the GPU is then full, so an actor Ray restarts
        # can only land on its own GPU.
        costliest = max(names, key=lambda n: costs[n])
        steps[costliest] += round(1 / GPU_GRANULARITY) - sum(steps.values())
        return {n: round(k * GPU_GRANULARITY, 6) for n, k in steps.items()}

    def _cpu_stage_cpus(self, cpu_stages: list[str]) -> dict[str, float]:
        """CPUs per actor of the stages set to num_gpus 0: a CPU each at most, within the CPUs outside the GPU
        bundles less one read or write task's."""
        replicas = {n: 1 if self.settings[n].replicas == "auto" else self.settings[n].replicas for n in cpu_stages}
        # An autoscaler's GPU nodes bring their CPUs with them; the cluster's CPUs now may not count them yet.
        cpus = max(self.cluster.cpus, self.cluster.gpus * (self.cluster.cpus_per_gpu or 0.0))
        room = cpus - self.cluster.gpus * self.bundle_cpus - task_cpus(cpus)
        return _cpu_actor_cpus(cpu_stages, self.settings, replicas, room, 1.0)

    def _assemble(self, groups, slots, batches, cpu_stages, pinned, auto) -> Plan:
        placements, row_costs = {}, {}
        cpu_stage_cpus = self._cpu_stage_cpus(cpu_stages) if cpu_stages else {}
        for spec in self.stages:
            name, s = spec.name, self.settings[spec.name]
            batch = batches[name]
            row_costs[name] = self.row_cost(name, batch)
            bundles = [b for b in sorted(slots) for n, _ in slots[b] if n == name]
            shares = [f for b in sorted(slots) for n, f in slots[b] if n == name]
            if name in cpu_stages:
                placements[name] = Placement(replicas=1 if s.replicas == "auto" else s.replicas, num_gpus=0.0,
                                             num_cpus=cpu_stage_cpus[name],
                                             batch_rows=max(1, batch // spec.images_per_row), batch_images=batch,
                                             threads=1)
                continue
            share = max(shares)
            cpus = s.num_cpus or min(self._split_cpus(slots[b])[name] for b in set(bundles))
            memory = (min(1.0, self.actor_memory(name, batch) / self.memory) if self.memory else None)
            placements[name] = Placement(replicas=len(bundles), num_gpus=share, num_cpus=cpus,
                                         batch_rows=max(1, batch // spec.images_per_row), batch_images=batch,
                                         threads=1, bundles=bundles, memory_fraction=memory)
        for bundle, hosted in slots.items():
            need = sum(placements[n].num_cpus for n, _ in hosted)
            if need > self.bundle_cpus + 1e-9:
                raise ConfigError(f"the actors on GPU {bundle} ({', '.join(n for n, _ in hosted)}) ask for {need:g} CPUs "
                                  f"but a GPU comes with {self.bundle_cpus:g}; lower stages.<stage>.num_cpus")
        if pinned:
            for bundle in sorted({b for n in pinned for b in placements[n].bundles}):
                hosted = [n for n, _ in slots[bundle]]
                groups.insert(0, GpuGroup(hosted, [bundle], sum(self.actor_memory(n, batches[n]) for n in hosted)))
        gpu_costs = {n: c for n, c in row_costs.items() if n not in cpu_stages}
        total = sum(gpu_costs.values())
        bound = self.cluster.gpus / total if total else None
        layout = ("fixed" if not auto else "co-located" if len(groups) == 1 and not pinned
                  else "dedicated" if all(len(g.stages) == 1 for g in groups) else "mixed")
        plan = Plan(placements=placements, row_costs=row_costs, gpus=self.cluster.gpus, layout=layout,
                    groups=groups, bundle_cpus=self.bundle_cpus, gpu_memory_gb=self.memory, bound=bound)
        plan.predicted = self._predicted(plan, gpu_costs) if bound else None
        return plan

    def _split_cpus(self, hosted: list[tuple[str, float]]) -> dict[str, float]:
        """CPUs per actor on one GPU: a hundredth each, and the rest of the GPU's CPUs by GPU share."""
        fixed = [(n, f) for n, f in hosted if self.settings[n].num_cpus]
        shared = [(n, f) for n, f in hosted if not self.settings[n].num_cpus]
        free = self.bundle_cpus - sum(self.settings[n].num_cpus for n, _ in fixed) - MIN_CPU_SHARE * len(shared)
        cpus: dict[str, float] = {n: self.settings[n].num_cpus for n, _ in fixed}
        for name, share in shared:
            each = MIN_CPU_SHARE + math.floor(max(0.0, free) * share * 100) / 100
            cpus[name] = min(cpus.get(name, each), each)
        return cpus

    def _predicted(self, plan: Plan, gpu_costs: dict[str, float]) -> float:
        """Steady rate of the slowest group (time on a shared GPU is split by demand) plus the drain."""
        rates = []
        for group in plan.groups:
            cost = sum(gpu_costs.get(n, 0.0) for n in group.stages)
            if cost > 0:
                rates.append(len(group.bundles) / cost)
        steady = min(rates) if rates else float("inf")
        return self._with_drain(steady, {n: (plan.placements[n].batch_rows, c) for n, c in gpu_costs.items()})

    def _with_drain(self, steady: float, batches: dict[str, tuple[int, float]]) -> float:
        """Rows/s over `rows`: the steady rate, plus the last rows passing every stage one batch after another
        (stage -> (rows per batch, GPU-seconds per row)) on GPUs that are otherwise idle by then."""
        if steady == float("inf"):
            return steady
        drain = sum(rows * cost for rows, cost in batches.values())
        return self.rows / (self.rows / steady + drain)


def _share_gpus(group_costs: list[float], gpus: int) -> list[int]:
    """Whole GPUs per group, one each, then each further GPU to the group that is slowest so far."""
    counts = [1] * len(group_costs)
    seconds_per_row = [(-cost, i) for i, cost in enumerate(group_costs)]
    heapq.heapify(seconds_per_row)
    for _ in range(gpus - len(group_costs)):
        _, i = heapq.heappop(seconds_per_row)
        counts[i] += 1
        heapq.heappush(seconds_per_row, (-group_costs[i] / counts[i], i))
    return counts


def _set_partitions(items: list[str]):
    """Every way to split `items` into non-empty groups (203 for six stages)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _set_partitions(rest):
        yield [[first]] + partition
        for i in range(len(partition)):
            yield partition[:i] + [[first] + partition[i]] + partition[i + 1:]
