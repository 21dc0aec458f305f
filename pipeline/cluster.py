"""What the connected Ray cluster has now and what its autoscaler can grow it to: GPUs, CPUs per GPU, accelerators."""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"
ACCELERATOR_LABEL = "ray.io/accelerator-type"
HEAD_RESOURCE = "node:__internal_head__"
MONITOR_SCRIPTS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")
READ_CONFIG_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class NodeType:
    """One node type the autoscaler can launch: resources per node and how many nodes at most (None: no cap)."""

    name: str
    resources: dict[str, float]
    max_workers: int | None
    min_workers: int = 0
    head: bool = False


@dataclass(frozen=True)
class AutoscalerConfig:
    """The autoscaler's node types and its cluster-wide caps (worker count and/or resource totals)."""

    node_types: tuple[NodeType, ...]
    max_workers: int | None = None
    max_resources: dict[str, float] = field(default_factory=dict)


def _alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def gpus_now() -> float:
    """GPUs on the cluster's alive nodes right now."""
    return float(sum(node["Resources"].get("GPU", 0.0) for node in _alive_nodes()))


def autoscaler_config(refresh: bool = False) -> AutoscalerConfig | None:
    """The connected cluster's autoscaler configuration, or None when it has no autoscaler (or hides it).

    Ray 2.60 publishes a ``ClusterConfig`` in the GCS only where a managed autoscaler reports one; this is read
    first. The open-source autoscaler (v1 and v2, ``ray up`` or ``ray start --autoscaling-config``) publishes
    nothing, so its monitor's config file is read on the head node, the way Ray's usage stats read
    ``~/ray_bootstrap_config.yaml``. A KubeRay autoscaler runs in a container of its own and is not seen: None.
    """
    import ray

    address = ray.get_runtime_context().gcs_address
    if refresh:
        _config_for.cache_clear()
    return _config_for(address)


@functools.lru_cache(maxsize=8)
def _config_for(gcs_address: str) -> AutoscalerConfig | None:
    return _from_cluster_config() or _from_monitor_config(gcs_address)


def _from_cluster_config() -> AutoscalerConfig | None:
    """The ``ClusterConfig`` a managed autoscaler reports to the GCS (what Ray Data reads), if there is one."""
    from ray._private.state import state

    return _parse_cluster_config(state.get_cluster_config())


def _parse_cluster_config(config) -> AutoscalerConfig | None:
    """An ``autoscaler_pb2.ClusterConfig`` as node types (``max_count`` -1: no cap) and resource caps."""
    if config is None or not config.node_group_configs:
        return None
    types = tuple(NodeType(name=group.name, resources={k: float(v) for k, v in group.resources.items()},
                           max_workers=None if group.max_count == -1 else int(group.max_count),
                           min_workers=int(group.min_count))
                  for group in config.node_group_configs)
    return AutoscalerConfig(node_types=types, max_resources={k: float(v) for k, v in config.max_resources.items()})


def _from_monitor_config(gcs_address: str) -> AutoscalerConfig | None:
    """The autoscaling config file of this cluster's monitor process, read by a zero-CPU task on the head node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [node["NodeID"] for node in _alive_nodes() if HEAD_RESOURCE in node["Resources"]]
    if not heads:
        return None
    read = ray.remote(num_cpus=0, max_retries=0)(_read_monitor_config).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(heads[0], soft=False))
    try:
        raw = ray.get(read.remote(gcs_address.rsplit(":", 1)[-1]), timeout=READ_CONFIG_TIMEOUT_S)
    except Exception as exc:  # a head that cannot run the task: report no autoscaler rather than fail the run
        log.warning("could not read the autoscaler config on the head node: %s", exc)
        return None
    return _parse_autoscaling_config(raw) if raw else None


def _read_monitor_config(gcs_port: str) -> dict | None:
    """On the head: the YAML/JSON config the monitor of the GCS at ``gcs_port`` runs with (None: no such file)."""
    import psutil
    import yaml

    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info.get("cmdline") or []
        if not any(arg.endswith(MONITOR_SCRIPTS) for arg in argv):
            continue
        options = dict(arg.split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
        if options.get("--gcs-address", "").rsplit(":", 1)[-1] != gcs_port:
            continue  # the monitor of another Ray cluster on the same machine
        path = options.get("--autoscaling-config")
        if not path:
            return None  # a fixed-size cluster: the monitor only mirrors the nodes there are
        with open(os.path.expanduser(path)) as f:
            return yaml.safe_load(f)
    return None


def _parse_autoscaling_config(raw: dict) -> AutoscalerConfig:
    """Node types from an autoscaling config (``available_node_types``, ``head_node_type``, ``max_workers``)."""
    head = raw.get("head_node_type")
    types = tuple(NodeType(name=name, resources={k: float(v) for k, v in (spec.get("resources") or {}).items()},
                           max_workers=0 if name == head else spec.get("max_workers", raw.get("max_workers")),
                           min_workers=0 if name == head else int(spec.get("min_workers", 0)), head=name == head)
                  for name, spec in (raw.get("available_node_types") or {}).items())
    return AutoscalerConfig(node_types=types, max_workers=raw.get("max_workers"))


def _max_resource(config: AutoscalerConfig, resource: str, head_amount: float) -> float:
    """The most of ``resource`` the cluster can reach: the head's plus the workers the caps allow, richest first."""
    workers_left = math.inf if config.max_workers is None else float(config.max_workers)
    workers = [t for t in config.node_types if not t.head]
    # Node types without the resource still keep their min_workers, which count against the cluster cap.
    workers_left -= sum(t.min_workers for t in workers if t.resources.get(resource, 0) <= 0)
    total = head_amount
    for node_type in sorted(workers, key=lambda t: -t.resources.get(resource, 0.0)):
        per_node = node_type.resources.get(resource, 0.0)
        if per_node <= 0 or workers_left <= 0:
            continue
        cap = math.inf if node_type.max_workers is None else float(node_type.max_workers)
        count = min(cap, workers_left)
        total += count * per_node
        workers_left -= count
    return min(total, config.max_resources.get(resource, math.inf))


def autoscaler_max_gpus() -> float | None:
    """GPUs the cluster can scale to (head plus every GPU node type at its max, within the cluster's caps).

    None when the cluster has no autoscaler; ``math.inf`` when a GPU node type has no upper bound. A managed
    ``ClusterConfig`` is summed over its node groups as Ray itself does (its head, if listed, is one of them).
    """
    config = autoscaler_config()
    if config is None:
        return None
    head = 0.0
    head_type = next((t for t in config.node_types if t.head), None)
    if head_type is not None:  # the head as it runs; its node type's resources may be left to autodetection
        heads = [node for node in _alive_nodes() if HEAD_RESOURCE in node["Resources"]]
        head = heads[0]["Resources"].get("GPU", 0.0) if heads else head_type.resources.get("GPU", 0.0)
    return float(_max_resource(config, "GPU", head))


def _launchable_types(config: AutoscalerConfig | None) -> list[NodeType]:
    """Worker node types the autoscaler may actually start (a nonzero node cap and cluster worker cap)."""
    if config is None or config.max_workers == 0:
        return []
    return [t for t in config.node_types if not t.head and t.max_workers != 0]


def cpus_per_gpu() -> float | None:
    """The fewest CPUs per GPU over GPU nodes: alive ones and node types the autoscaler can add; None: no GPUs."""
    ratios = [node["Resources"].get("CPU", 0.0) / node["Resources"]["GPU"] for node in _alive_nodes()
              if node["Resources"].get("GPU", 0.0) > 0]
    ratios += [t.resources.get("CPU", 0.0) / t.resources["GPU"] for t in _launchable_types(autoscaler_config())
               if t.resources.get("GPU", 0.0) > 0]
    return min(ratios) if ratios else None


def accelerator_types() -> set[str]:
    """Accelerator types (e.g. ``A10G``) of alive nodes and of node types the autoscaler can add."""
    found = set()
    for node in _alive_nodes():
        found.update(key[len(ACCELERATOR_RESOURCE_PREFIX):] for key in node["Resources"]
                     if key.startswith(ACCELERATOR_RESOURCE_PREFIX))
        label = (node.get("Labels") or {}).get(ACCELERATOR_LABEL)
        if label:
            found.add(label)
    for node_type in _launchable_types(autoscaler_config()):
        found.update(key[len(ACCELERATOR_RESOURCE_PREFIX):] for key in node_type.resources
                     if key.startswith(ACCELERATOR_RESOURCE_PREFIX))
    return found
