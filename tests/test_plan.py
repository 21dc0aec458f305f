"""Planning: the stage list follows the config; placements fit the cluster and ask no GPUs without GPUs."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.costs import profile_costs
from pipeline.plan import _best_fit, plan_placements, stage_specs


def config(*overrides):
    return load_config(None, list(overrides), input_path="in", output_path="out", preset="tiny")


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
    placements = plan_placements(config(), stage_specs(config()), cluster_cpus=2, cluster_gpus=0).placements
    assert all(p.num_gpus == 0 for p in placements.values())
    assert sum(p.num_cpus * p.replicas for p in placements.values()) <= 1.0 + 1e-9


def _placeable(plan, gpus):
    items = [p.num_gpus for p in plan.placements.values() for _ in range(p.replicas)]
    return _best_fit(items, gpus) and _best_fit(items[::-1], gpus)


@pytest.mark.parametrize("gpus", [1, 2, 8, 16])
def test_auto_plan_places_and_comes_close_to_the_bound(gpus):
    cfg = config()
    plan = plan_placements(cfg, stage_specs(cfg), cluster_cpus=64, cluster_gpus=gpus,
                           image_costs=profile_costs("dalle2"), rows=100_000)
    assert _placeable(plan, gpus)
    assert plan.bound == pytest.approx(gpus / sum(plan.row_costs.values()))
    assert plan.predicted >= 0.9 * plan.bound, plan.table()
    rates = {n: p.replicas * p.num_gpus / plan.row_costs[n] for n, p in plan.placements.items()}
    assert min(rates.values()) >= 0.9 * plan.bound, "no stage is starved of GPU time"


def test_best_fit_models_fragmentation():
    assert _best_fit([0.6, 0.6, 0.4, 0.4], 2)
    assert not _best_fit([0.7, 0.7, 0.5], 2), "0.5 fits nowhere once two 0.7 actors hold a GPU each"


def test_batch_rows_count_candidates():
    cfg = config("rerank.candidates=4", "stages.decoder.batch_size=8")
    assert plan_placements(cfg, stage_specs(cfg), 4, 0).placements["decoder"].batch_rows == 2


def test_fixed_requests_beyond_the_cluster_are_a_config_error():
    cfg = config("stages.decoder.num_gpus=1", "stages.decoder.replicas=3")
    with pytest.raises(ConfigError, match="stages ask for 3 GPUs"):
        plan_placements(cfg, stage_specs(cfg), cluster_cpus=8, cluster_gpus=2)


def test_fixed_stages_are_kept_and_auto_ones_fill_the_rest():
    cfg = config("stages.decoder.num_gpus=1", "stages.decoder.replicas=1")
    plan = plan_placements(cfg, stage_specs(cfg), 16, 2, profile_costs("dalle2"), rows=1000)
    assert (plan.placements["decoder"].replicas, plan.placements["decoder"].num_gpus) == (1, 1.0)
    assert _placeable(plan, 2)


@pytest.mark.parametrize("cpus_per_gpu", [2, 8])
def test_gpu_actors_ask_for_cpus_in_proportion_so_they_fit_where_their_gpu_share_fits(cpus_per_gpu):
    # The node-loss setting: four stages of 0.2 GPU each on a node with 1 GPU and few CPUs.
    stages = ("text_encoder", "prior", "decoder", "upsampler_256")
    cfg = config("models.upsampler_1024=null", "models.clip=null",
                 *[f"stages.{s}.num_gpus=0.2" for s in stages], *[f"stages.{s}.replicas=1" for s in stages])
    plan = plan_placements(cfg, stage_specs(cfg), cluster_cpus=2 + cpus_per_gpu, cluster_gpus=1,
                           cpus_per_gpu=cpus_per_gpu)
    used = sum(p.num_cpus * p.replicas for p in plan.placements.values())
    assert used <= cpus_per_gpu - min(1, cpus_per_gpu / 4) + 1e-9  # room left on the node for read/write tasks
    assert all(0 < p.num_cpus <= 1 for p in plan.placements.values())
