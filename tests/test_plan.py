"""Planning: the stage list follows the config; placements fit the cluster and ask no GPUs without GPUs."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.plan import _packs, plan_placements, stage_specs


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
    stages = stage_specs(config())
    placements = plan_placements(config(), stages, cluster_cpus=2, cluster_gpus=0)
    assert all(p.num_gpus == 0 for p in placements.values())
    assert sum(p.num_cpus * p.replicas for p in placements.values()) <= 1.0 + 1e-9


def test_gpu_shares_follow_cost_and_pack_onto_gpus():
    stages = stage_specs(config())
    placements = plan_placements(config(), stages, cluster_cpus=16, cluster_gpus=2)
    fractions = {n: p.num_gpus for n, p in placements.items()}
    assert _packs(fractions, {n: p.replicas for n, p in placements.items()}, 2)
    assert fractions["upsampler_1024"] > fractions["prior"] > fractions["text_encoder"]
    big = plan_placements(config(), stages, cluster_cpus=64, cluster_gpus=16)
    assert big["upsampler_1024"].replicas > 1 and big["upsampler_1024"].num_gpus == 1.0


def test_batch_rows_count_candidates():
    stages = stage_specs(config("rerank.candidates=4", "stages.decoder.batch_size=8"))
    placements = plan_placements(config("rerank.candidates=4", "stages.decoder.batch_size=8"), stages, 4, 0)
    assert placements["decoder"].batch_rows == 2


def test_fixed_requests_beyond_the_cluster_are_a_config_error():
    cfg = config("stages.decoder.num_gpus=1", "stages.decoder.replicas=3")
    with pytest.raises(ConfigError, match="stages ask for 3 GPUs"):
        plan_placements(cfg, stage_specs(cfg), cluster_cpus=8, cluster_gpus=2)
