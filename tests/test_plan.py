"""Planning: the stage list follows the config; layouts are placeable, fit in memory, and balance by cost."""

from __future__ import annotations

import random

import pytest

from pipeline.config import STAGE_NAMES as STAGES
from pipeline.config import ConfigError, load_config
from pipeline.costs import StageCost
from pipeline.plan import MEMORY_MARGIN, ClusterShape, fused_placement, plan_placements, stage_specs
from pipeline.plan import CUDA_CONTEXT_GB
from benchmarks.event_model import NO_OVERHEADS, ActorSpec, StageTiming, simulate

# GPU-seconds per image in the proportions of DALL-E 2's published model sizes and steps; no overheads.
PAPER_SECONDS = {"text_encoder": 0.0004, "prior": 0.166, "decoder": 0.449, "reranker": 0.0026,
                 "upsampler_256": 0.0775, "upsampler_1024": 0.295}


def config(*overrides):
    return load_config(None, list(overrides), input_path="in", output_path="out", preset="tiny")


def costs(weights_gb: float = 1.0, activation_gb: float = 0.1, overhead_s: float = 0.0) -> dict[str, StageCost]:
    return {name: StageCost(seconds_per_image=seconds, batch_overhead_s=overhead_s, weights_gb=weights_gb,
                            activation_gb_per_image=activation_gb) for name, seconds in PAPER_SECONDS.items()}


def hand_bound(cfg, gpus: int) -> float:
    """Rows/s no layout can beat, counted by hand: the GPUs over each stage's paper seconds per image times
    the images a row holds at that stage (no overheads in `costs()`)."""
    return gpus / sum(PAPER_SECONDS[s.name] * s.images_per_row for s in stage_specs(cfg))


def simulated(plan, cfg, rows: int) -> float:
    """Rows/s of the plan's actors, each pinned to its bundle, in the event-driven model of the actor pools
    (benchmarks/event_model.py) with an ideal dispatcher: an estimate independent of the planner's formula."""
    specs = stage_specs(cfg)
    order = [s.name for s in specs]
    timing = {s.name: StageTiming(0.0, PAPER_SECONDS[s.name] * s.images_per_row, plan.placements[s.name].batch_rows)
              for s in specs}
    actors = [ActorSpec(n, b) for n in order for b in plan.placements[n].bundles]
    return simulate(order, actors, timing, rows=rows, gpus=plan.gpus, overheads=NO_OVERHEADS).throughput


def check_layout(plan, cluster: ClusterShape, cost: dict[str, StageCost]) -> None:
    """What Ray needs to place the plan exactly: every actor on a bundle that exists, at most one GPU of
    shares per bundle, CPUs within the bundle, memory within the GPU."""
    hosted = plan.bundle_of_actors()
    assert all(0 <= bundle < cluster.gpus for bundle in hosted), hosted
    for bundle, names in hosted.items():
        shares = sum(plan.placements[n].num_gpus for n in names)
        assert shares <= 1 + 1e-9, f"GPU {bundle} shares sum to {shares}"
        cpus = sum(plan.placements[n].num_cpus for n in names)
        assert cpus <= plan.bundle_cpus + 1e-9, f"GPU {bundle} actors ask {cpus} CPUs of {plan.bundle_cpus}"
        if cluster.gpu_memory_gb:
            memory = sum(cost[n].memory_gb(plan.placements[n].batch_images) + CUDA_CONTEXT_GB for n in names)
            assert memory <= cluster.gpu_memory_gb * MEMORY_MARGIN + 1e-9, f"GPU {bundle} needs {memory} GB"
    for name, p in plan.placements.items():
        assert p.replicas == len(p.bundles) or p.num_gpus == 0
        assert p.batch_rows >= 1 and p.batch_images >= 1


def test_stage_list_follows_rerank_position_and_1024():
    names = [s.name for s in stage_specs(config("rerank.candidates=4", "rerank.keep=2"))]
    assert names == ["text_encoder", "prior", "decoder", "reranker", "upsampler_256", "upsampler_1024"]
    specs = {s.name: s for s in stage_specs(config("rerank.candidates=4", "rerank.keep=2"))}
    assert specs["decoder"].images_per_row == 4 and specs["upsampler_256"].images_per_row == 2
    assert specs["upsampler_1024"].final_image and not specs["upsampler_256"].final_image
    late = [s.name for s in stage_specs(config("rerank.candidates=4", "rerank.keep=2", "rerank.at=upsampler_256"))]
    assert late == ["text_encoder", "prior", "decoder", "upsampler_256", "reranker", "upsampler_1024"]
    short = stage_specs(config("models.upsampler_1024=null", "models.clip=null"))
    assert [s.name for s in short] == ["text_encoder", "prior", "decoder", "upsampler_256"]
    assert short[-1].final_image


def test_cpu_only_cluster_asks_for_no_gpus_and_leaves_a_cpu_for_io():
    plan = plan_placements(config(), stage_specs(config()), ClusterShape(cpus=2, gpus=0))
    assert plan.layout == "cpu"
    assert all(p.num_gpus == 0 and not p.bundles for p in plan.placements.values())
    assert sum(p.num_cpus * p.replicas for p in plan.placements.values()) <= 1.0 + 1e-9


@pytest.mark.parametrize("gpus", [1, 2, 8, 16])
def test_models_that_fit_together_are_co_located_on_every_gpu(gpus):
    cfg, cost = config("rerank.candidates=2", "rerank.keep=1"), costs()
    cluster = ClusterShape(cpus=8 * gpus, gpus=gpus, gpu_memory_gb=80)
    plan = plan_placements(cfg, stage_specs(cfg), cluster, cost, rows=2000)
    check_layout(plan, cluster, cost)
    assert plan.layout == "co-located"
    for name, p in plan.placements.items():
        assert p.bundles == list(range(gpus)), f"{name} is not on every GPU once"
    hosted = plan.bundle_of_actors()
    assert all(sum(plan.placements[n].num_gpus for n in hosted[b]) == pytest.approx(1.0) for b in hosted)
    # Checked against figures the planner did not make: the bound by hand, the rate by the event model.
    bound, rate = hand_bound(cfg, gpus), simulated(plan, cfg, rows=2000)
    assert plan.bound == pytest.approx(bound, rel=1e-6)
    assert rate >= 0.95 * bound, plan.table()
    assert plan.predicted == pytest.approx(rate, rel=0.03), plan.table()


def test_fused_stages_take_what_one_actor_of_every_stage_took_and_need_a_co_located_plan():
    cfg, cost = config("rerank.candidates=2", "rerank.keep=1", "run.fuse_stages=true"), costs()
    cluster = ClusterShape(cpus=16, gpus=2, gpu_memory_gb=80)
    plan = plan_placements(cfg, stage_specs(cfg), cluster, cost, rows=2000)
    fused = fused_placement(plan.placements, plan.layout)
    assert (fused.replicas, fused.bundles) == (2, [0, 1])
    assert fused.num_gpus == pytest.approx(1.0) and fused.memory_fraction is not None
    assert fused.num_cpus == pytest.approx(sum(p.num_cpus for p in plan.placements.values()))
    assert fused.batch_rows == max(p.batch_rows for p in plan.placements.values())
    split = plan_placements(config("run.fuse_stages=true"), stage_specs(cfg), ClusterShape(cpus=64, gpus=16, gpu_memory_gb=16),
                            costs(weights_gb=5.0, activation_gb=0.5), rows=2000)
    with pytest.raises(ConfigError, match=r"run.fuse_stages needs every GPU to host every stage, but this plan is "
                                          r"(dedicated|mixed) \(text_encoder: \d+ actor\(s\)"):
        fused_placement(split.placements, split.layout)


def test_models_that_do_not_fit_together_get_gpus_of_their_own_in_proportion_to_cost():
    cfg = config()
    cost = costs(weights_gb=5.0, activation_gb=0.5)
    cluster = ClusterShape(cpus=64, gpus=16, gpu_memory_gb=16)
    plan = plan_placements(cfg, stage_specs(cfg), cluster, cost, rows=2000)
    check_layout(plan, cluster, cost)
    assert plan.layout in ("dedicated", "mixed")
    gpus_of = {n: len(p.bundles) for n, p in plan.placements.items()}
    assert gpus_of["decoder"] > gpus_of["upsampler_256"] >= 1, plan.table()
    assert sum(len(g.bundles) for g in plan.groups) == 16
    bound, rate = hand_bound(cfg, 16), simulated(plan, cfg, rows=2000)
    assert plan.bound == pytest.approx(bound, rel=1e-6)
    assert rate >= 0.8 * bound, plan.table()
    assert plan.predicted == pytest.approx(rate, rel=0.03), plan.table()


def test_a_stage_that_cannot_fit_one_gpu_is_a_config_error_naming_it():
    cfg = config("stages.upsampler_1024.batch_size=4")
    cost = costs()
    cost["upsampler_1024"] = StageCost(seconds_per_image=0.3, weights_gb=2, activation_gb_per_image=4)
    with pytest.raises(ConfigError, match="stage upsampler_1024 needs .* GB at batch 4"):
        plan_placements(cfg, stage_specs(cfg), ClusterShape(cpus=16, gpus=2, gpu_memory_gb=16), cost)


def test_auto_batch_amortises_overhead_within_memory():
    cfg = config()
    cost = {n: StageCost(seconds_per_image=0.1, batch_overhead_s=0.5, weights_gb=1, activation_gb_per_image=1)
            for n in STAGES}
    roomy = plan_placements(cfg, stage_specs(cfg), ClusterShape(cpus=64, gpus=8, gpu_memory_gb=1000), cost)
    # overhead <= 5% of a batch's time: b >= 0.5 * 0.95 / (0.05 * 0.1) = 95, capped at 64
    assert all(p.batch_images == 64 for p in roomy.placements.values())
    tight = plan_placements(cfg, stage_specs(cfg), ClusterShape(cpus=64, gpus=8, gpu_memory_gb=24), cost)
    check_layout(tight, ClusterShape(cpus=64, gpus=8, gpu_memory_gb=24), cost)
    assert all(p.batch_images < 64 for p in tight.placements.values())


def test_batch_rows_count_candidates():
    cfg = config("rerank.candidates=4", "stages.decoder.batch_size=8")
    assert plan_placements(cfg, stage_specs(cfg), ClusterShape(4, 0)).placements["decoder"].batch_rows == 2


def test_fixed_requests_beyond_the_cluster_are_a_config_error():
    cfg = config("stages.decoder.num_gpus=1", "stages.decoder.replicas=3")
    with pytest.raises(ConfigError, match="stages ask for 3 GPUs"):
        plan_placements(cfg, stage_specs(cfg), ClusterShape(cpus=8, gpus=2))


def test_fixed_stages_are_kept_and_auto_ones_fill_the_rest():
    cfg = config("stages.decoder.num_gpus=1", "stages.decoder.replicas=1")
    cluster = ClusterShape(16, 3)
    plan = plan_placements(cfg, stage_specs(cfg), cluster, costs(), rows=1000)
    check_layout(plan, cluster, costs())
    assert (plan.placements["decoder"].replicas, plan.placements["decoder"].num_gpus) == (1, 1.0)
    decoder_gpu = plan.placements["decoder"].bundles[0]
    assert plan.bundle_of_actors()[decoder_gpu] == ["decoder"]


def test_a_stage_set_to_zero_gpus_runs_on_cpu_beside_gpu_stages():
    cfg = config("stages.reranker.num_gpus=0", "rerank.candidates=2", "rerank.keep=1")
    cluster = ClusterShape(16, 2)
    plan = plan_placements(cfg, stage_specs(cfg), cluster, costs())
    check_layout(plan, cluster, costs())
    assert plan.placements["reranker"].num_gpus == 0 and not plan.placements["reranker"].bundles
    assert plan.placements["decoder"].bundles == [0, 1]


@pytest.mark.parametrize("cpus_per_gpu", [2, 8])
def test_gpu_actors_ask_for_cpus_in_proportion_so_they_fit_where_their_gpu_share_fits(cpus_per_gpu):
    # The node-loss setting: four stages of 0.2 GPU each on a node with 1 GPU and few CPUs.
    stages = ("text_encoder", "prior", "decoder", "upsampler_256")
    cfg = config("models.upsampler_1024=null", "models.clip=null",
                 *[f"stages.{s}.num_gpus=0.2" for s in stages], *[f"stages.{s}.replicas=1" for s in stages])
    plan = plan_placements(cfg, stage_specs(cfg), ClusterShape(cpus=2 + cpus_per_gpu, gpus=1,
                                                               cpus_per_gpu=cpus_per_gpu))
    used = sum(p.num_cpus * p.replicas for p in plan.placements.values())
    assert used <= cpus_per_gpu - min(1, cpus_per_gpu / 4) + 1e-9  # room left on the node for read/write tasks
    assert all(0 < p.num_cpus <= 1 for p in plan.placements.values())
    assert plan.layout == "fixed" and plan.bundle_of_actors() == {0: list(stages)}


def test_planner_never_crashes_and_never_returns_an_unplaceable_layout():
    """Random stage settings and cluster shapes: a layout Ray can place exactly, or a one-line ConfigError."""
    rng = random.Random(7)
    refused = 0
    for trial in range(300):
        sets = [f"rerank.candidates={rng.choice([1, 2, 4])}", "rerank.keep=1",
                f"rerank.at={rng.choice(['decoder', 'upsampler_256'])}"]
        for name in STAGES:
            if rng.random() < 0.3:
                sets.append(f"stages.{name}.num_gpus={rng.choice([0, 0.1, 0.25, 0.5, 1])}")
            if rng.random() < 0.3:
                sets.append(f"stages.{name}.replicas={rng.randint(1, 4)}")
            if rng.random() < 0.3:
                sets.append(f"stages.{name}.batch_size={rng.choice([1, 4, 16])}")
        cfg = config(*sets)
        cost = {n: StageCost(seconds_per_image=rng.choice([0.0, 1e-4, 0.01, 0.3]),
                             batch_overhead_s=rng.choice([0.0, 0.05]), weights_gb=rng.choice([0.0, 1.0, 6.0]),
                             activation_gb_per_image=rng.choice([0.0, 0.2, 2.0])) for n in STAGES}
        cluster = ClusterShape(cpus=rng.choice([2, 8, 64]), gpus=rng.choice([0, 1, 2, 3, 8, 64]),
                               cpus_per_gpu=rng.choice([None, 1, 4, 12]), gpu_memory_gb=rng.choice([None, 16, 24, 80]))
        try:
            plan = plan_placements(cfg, stage_specs(cfg), cluster, cost, rows=rng.choice([1, 100, 10_000]))
        except ConfigError as exc:
            assert "\n" not in str(exc) and str(exc), trial
            refused += 1
            continue
        check_layout(plan, cluster, cost)
    assert refused < 200, "most random settings are placeable"


def random_stage_settings(rng: random.Random) -> list[str]:
    """Settings a user may write: every stage's GPU share, replicas, batch and CPUs; optional models; candidates."""
    candidates = rng.choice([1, 2, 3, 4, 8])
    sets = [f"rerank.candidates={candidates}", f"rerank.keep={rng.randint(1, candidates)}",
            f"rerank.at={rng.choice(['decoder', 'upsampler_256'])}"]
    if rng.random() < 0.3:
        sets.append("models.upsampler_1024=null")
    if rng.random() < 0.3:
        sets.append("models.clip=null")
    for name in STAGES:
        sets.append(f"stages.{name}.num_gpus={rng.choice(['auto', 'auto', 0, 0.05, 0.1, 0.25, 0.3, 0.5, 1])}")
        sets.append(f"stages.{name}.replicas={rng.choice(['auto', 'auto', 1, 2, 3, 4])}")
        sets.append(f"stages.{name}.batch_size={rng.choice(['auto', 1, 2, 4, 16, 64])}")
        if rng.random() < 0.2:
            sets.append(f"stages.{name}.num_cpus={rng.choice([0.1, 0.5, 1, 2])}")
    return sets


def random_cluster(rng: random.Random) -> ClusterShape:
    """A cluster as the driver sees it: its CPUs include every GPU node's, plus any CPU-only nodes."""
    gpus = rng.randint(0, 16)
    cpus_per_gpu = rng.choice([None, 1, 2, 4, 12]) if gpus else None
    extra = rng.choice([1, 2, 4, 8, 16, 64, 128])
    cpus = gpus * cpus_per_gpu + extra if cpus_per_gpu else extra
    return ClusterShape(cpus=cpus, gpus=gpus, cpus_per_gpu=cpus_per_gpu,
                        gpu_memory_gb=rng.choice([None, None, 8, 16, 24, 80]))


def check_cpus_fit(plan, cluster: ClusterShape) -> None:
    """The GPU bundles' CPUs plus every CPU actor leave room in the cluster for one read or write task."""
    from pipeline.plan import task_cpus

    reserved = cluster.gpus * plan.bundle_cpus if plan.gpus else 0.0
    cpu_actors = sum(p.num_cpus * p.replicas for p in plan.placements.values() if not p.bundles)
    assert all(p.num_cpus > 0 for p in plan.placements.values())
    assert reserved + cpu_actors + task_cpus(cluster.cpus) <= cluster.cpus + 1e-9, \
        f"{reserved} CPUs in GPU bundles + {cpu_actors} for CPU actors leave no room for I/O on {cluster.cpus} CPUs"


def test_any_settings_on_any_cluster_give_a_placeable_plan_or_a_one_line_config_error():
    """Random user settings on random clusters: never a crash, never a plan Ray cannot place exactly."""
    rng = random.Random(20261202)
    planned = refused = 0
    for trial in range(400):
        sets = random_stage_settings(rng)
        try:
            cfg = config(*sets)
        except ConfigError:
            continue
        cluster = random_cluster(rng)
        cost = None if rng.random() < 0.3 else {
            n: StageCost(seconds_per_image=rng.choice([0.0, 1e-4, 0.01, 0.3]), batch_overhead_s=rng.choice([0.0, 0.05]),
                         weights_gb=rng.choice([0.0, 1.0, 6.0]), activation_gb_per_image=rng.choice([0.0, 0.2, 2.0]))
            for n in STAGES}
        try:
            plan = plan_placements(cfg, stage_specs(cfg), cluster, cost, rows=rng.choice([1, 100, 10_000]))
        except ConfigError as exc:
            assert str(exc) and "\n" not in str(exc), (trial, sets, cluster)
            refused += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the property under test: nothing but ConfigError escapes
            pytest.fail(f"trial {trial}: {type(exc).__name__}: {exc} for {sets} on {cluster}")
        assert set(plan.placements) == {s.name for s in stage_specs(cfg)}
        check_layout(plan, cluster, cost or {n: StageCost() for n in STAGES})
        check_cpus_fit(plan, cluster)
        assert plan.table()  # logged before the run starts
        planned += 1
    assert planned > 100 and refused > 10, (planned, refused)


def test_a_cpu_stage_beside_gpu_stages_leaves_a_machine_room_for_reading_and_writing():
    # The test session's machine: 4 CPUs, 2 GPUs; the GPU bundles take 3 CPUs, a whole CPU for the reranker
    # would leave the read and write tasks none.
    from pipeline.plan import task_cpus

    cfg = config("stages.reranker.num_gpus=0", "rerank.candidates=2", "rerank.keep=1")
    cluster = ClusterShape(cpus=4, gpus=2)
    plan = plan_placements(cfg, stage_specs(cfg), cluster)
    check_cpus_fit(plan, cluster)
    assert 0 < plan.placements["reranker"].num_cpus <= 4 - 2 * plan.bundle_cpus - task_cpus(4)
    with pytest.raises(ConfigError, match=r"stages on CPU \(reranker\) need at least 3 CPUs .* lower "
                                          r"stages.<stage>.num_cpus or replicas"):
        plan_placements(config("stages.reranker.num_gpus=0", "stages.reranker.num_cpus=1",
                               "stages.reranker.replicas=3"), stage_specs(cfg), cluster)
