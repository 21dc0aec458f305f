"""The shipped deployment files: KubeRay manifests (jobs/k8s/) and the AWS cluster launcher config (cluster.yaml)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.generate import parse_args
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "jobs" / "k8s"
SECRET_PATTERNS = [r"AKIA[0-9A-Z]{16}", r"aws_access_key_id", r"aws_secret_access_key", r"secret_key",
                   r"BEGIN [A-Z ]*PRIVATE KEY"]


def pinned(package: str) -> str:
    return re.search(rf'"{package}(\[[^\]]*\])?==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(2)


def job_spec(name: str) -> dict:
    manifest = yaml.safe_load((K8S / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    return manifest


def check_ray_job_spec(spec: dict, window: str) -> None:
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.generate"]
    args = parse_args(argv[3:])
    assert args.window == window
    # The entrypoint's own config and templated paths resolve to a valid run (from the image's working dir).
    config = load_config(str(ROOT / args.config), args.overrides, input_path=args.input, output_path=args.output,
                         window=args.window)
    assert "{window}" not in config.output.path and config.output.path.startswith("s3://")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned("ray")
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs no stage
    images = {head["template"]["spec"]["containers"][0]["image"]}
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
        gpus += int(container["resources"]["limits"]["nvidia.com/gpu"]) * group["replicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert len(images) == 1 and images.pop()  # one image everywhere, so driver and workers agree
    assert gpus >= 1
    # The run waits for every worker GPU rather than planning for the ones that joined before it started.
    assert config.run.gpus == gpus
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_manifest_runs_one_window_on_gpu_workers():
    manifest = job_spec("rayjob.yaml")
    assert manifest["kind"] == "RayJob"
    check_ray_job_spec(manifest["spec"], window="2026-11-24")


def test_raycronjob_manifest_schedules_auto_windows_one_at_a_time():
    manifest = job_spec("raycronjob.yaml")
    assert manifest["kind"] == "RayCronJob"
    spec = manifest["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[0-9*/,-]+", f) for f in fields)
    assert spec["concurrencyPolicy"] == "Forbid"
    check_ray_job_spec(spec["jobTemplate"], window="auto")


def test_image_matches_the_pinned_ray():
    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pinned('ray')}-" in dockerfile and "pip install" in dockerfile


def test_cluster_yaml_is_a_valid_launcher_config_with_a_cpu_head_and_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(raw)
    validate_config(prepare_config(yaml.safe_load(raw)))  # Ray's own schema and cross-checks
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    families = {t["node_config"]["InstanceType"].split(".")[0] for t in workers.values()}
    assert {"g5", "p4d"} <= families
    assert all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in workers.values())
    # S3 through an instance profile on every node, never keys in the file.
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "unclip-ray" in setup


@pytest.mark.parametrize("path", ["cluster.yaml", "jobs/k8s/rayjob.yaml", "jobs/k8s/raycronjob.yaml",
                                  "jobs/k8s/run.yaml", "jobs/k8s/Dockerfile"])
def test_no_credentials_in_deployment_files(path):
    text = (ROOT / path).read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text, re.IGNORECASE), f"{path} matches {pattern}"
