"""What the cluster can reach, and a run on a real autoscaler that adds GPU nodes from zero (fake GPU nodes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline import cluster
from pipeline.config import load_config
from tests.autoscaling_cluster import AutoscalingFakeCluster, is_alive
from tests.conftest import FAST_STEPS, model_overrides, run_in_process, within_tolerance, write_prompts

HEAD_NODE = r"""
import json, os
import ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
print(json.dumps([n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]))
"""

# Runs as a driver of the fake cluster: this pytest process is already the driver of the session's own Ray.
SCALE_UP_PROBE = r"""
import json, os, time
import ray
from pipeline import cluster

ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
before = {"max_gpus": cluster.autoscaler_max_gpus(), "gpus_now": cluster.gpus_now(),
          "cpus_per_gpu": cluster.cpus_per_gpu(), "accelerators": sorted(cluster.accelerator_types())}
print(json.dumps(before))
"""


def test_a_run_scales_gpu_nodes_from_zero_and_equals_the_static_run(ray_session, tiny_models, tmp_path):
    """A CPU-only head and a GPU node type with min_workers 0: the run plans for the GPU the autoscaler can
    add, waits for it, runs every stage on it, and makes the images an in-process run makes."""
    prompts = ["a red fox", "a blue bird", "a green frog"]
    path = write_prompts(tmp_path / "p.parquet", prompts)
    # Fused: one actor process runs every stage on the new node (the session run checks one actor per stage).
    sets = FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False) + ["seed=5",
                                                                                         "run.fuse_stages=true"]
    output = tmp_path / "out"

    @ray_session.remote
    def one():
        return 1

    with AutoscalingFakeCluster(head_cpus=2, gpu_worker={"cpus": 2, "gpus": 1, "max_workers": 1,
                                                         "accelerator_type": "A10G"}) as fake:
        before = fake.run_driver(SCALE_UP_PROBE)
        job = subprocess.run([sys.executable, "-m", "jobs.generate", "--input", path, "--output", str(output),
                              *[arg for s in sets for arg in ("--set", s)]],
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=fake.env,
                             capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stderr[-3000:] + fake.monitor_log()[-2000:]
        head = fake.run_driver(HEAD_NODE)
        ours = fake.processes()

    assert before == {"max_gpus": 1.0, "gpus_now": 0.0, "cpus_per_gpu": 2.0, "accelerators": ["A10G"]}
    assert "waiting for 1 GPU(s) (0 in the cluster now" in job.stderr
    summary = json.loads((output / "_SUCCESS.json").read_text())
    assert summary["plan"]["gpus"] == 1 and summary["plan"]["layout"] == "co-located"
    assert {a["stage"] for a in summary["actors"]} == {"text_encoder", "prior", "decoder", "upsampler_256"}
    for actor in summary["actors"]:  # every stage actor on the GPU worker, pinned to the one bundle
        assert actor["gpu_ids"] and actor["bundle"] == 0 and actor["node"] not in head, actor
    assert summary["counts"]["ok"] == 3
    config = load_config(None, sets, input_path=path, output_path="unused")
    metadata = sorted(pq.read_table(output / "metadata").to_pylist(), key=lambda r: r["id"])
    reference = run_in_process(config, [r["prompt"] for r in metadata], [[r["seed"]] for r in metadata])["image"]
    for row, expected in zip(metadata, reference):
        with Image.open(output / row["image_key"]) as image:
            assert within_tolerance(np.asarray(image.convert("RGB")), expected[0]), row["id"]

    assert ours and not [pid for pid in ours if is_alive(pid)]
    assert not os.path.exists(fake.temp_dir)
    assert ray_session.get(one.remote(), timeout=60) == 1  # the session's own Ray outlived the teardown


def test_plain_ray_has_no_autoscaler(ray_session):
    total = ray_session.cluster_resources()
    assert cluster.autoscaler_max_gpus() is None
    assert cluster.gpus_now() == total["GPU"] > 0
    assert cluster.cpus_per_gpu() == total["CPU"] / total["GPU"]
    assert cluster.accelerator_types() == set()


def test_max_gpus_respect_node_type_and_cluster_caps():
    raw = {"max_workers": 4, "head_node_type": "head",
           "available_node_types": {
               "head": {"resources": {"CPU": 4}, "max_workers": 0},
               "cpu": {"resources": {"CPU": 16}, "min_workers": 1, "max_workers": 5},
               "gpu4": {"resources": {"CPU": 32, "GPU": 4}, "max_workers": 2},
               "gpu1": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 10}}}
    config = cluster._parse_autoscaling_config(raw)
    # 4 workers at most, one of them the CPU node kept by min_workers: two 4-GPU nodes, then one 1-GPU node.
    assert cluster._max_resource(config, "GPU", head_amount=0.0) == 9.0
    unbounded = cluster._parse_autoscaling_config({**raw, "max_workers": None})
    assert cluster._max_resource(unbounded, "GPU", head_amount=0.0) == 18.0


def test_managed_cluster_config_is_read_like_ray_data_reads_it():
    from ray.core.generated import autoscaler_pb2

    proto = autoscaler_pb2.ClusterConfig(
        node_group_configs=[autoscaler_pb2.NodeGroupConfig(name="a10g", resources={"CPU": 8, "GPU": 1},
                                                           min_count=0, max_count=4),
                            autoscaler_pb2.NodeGroupConfig(name="spot", resources={"CPU": 4, "GPU": 1},
                                                           min_count=0, max_count=-1)],
        max_resources={"GPU": 6})
    config = cluster._parse_cluster_config(proto)
    assert [t.max_workers for t in config.node_types] == [4, None]
    assert cluster._max_resource(config, "GPU", head_amount=0.0) == 6.0
    assert cluster._max_resource(cluster.AutoscalerConfig(config.node_types), "GPU", 0.0) == math.inf
    assert cluster._parse_cluster_config(None) is None
