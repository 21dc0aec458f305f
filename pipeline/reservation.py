"""GPU reservation: one placement-group bundle per planned GPU, waited for, and each stage actor pinned to one."""

from __future__ import annotations

import itertools
import time
from typing import Callable

from pipeline.progress import BUNDLE_ENV

WAIT_REPORT_S = 30.0


class ReservationTimeout(RuntimeError):
    """The cluster did not provide the planned GPUs in time; one line for the user."""


class GpuReservation:
    """The run's GPUs, held for its whole length.

    A placement group with one {GPU: 1, CPU: c} bundle per planned GPU is both how the actors get pinned
    (Ray assigns a fractional-GPU actor best-fit, so without bundles a stage's actors stack on the same GPUs)
    and how an autoscaler learns the demand: it launches GPU nodes until the group is placed.
    """

    def __init__(self, gpus: int, cpus_per_bundle: float):
        from ray.util.placement_group import placement_group

        self.gpus = gpus
        self.bundle = {"GPU": 1.0, "CPU": cpus_per_bundle}
        self.group = placement_group([dict(self.bundle) for _ in range(gpus)], strategy="PACK",
                                     name=f"unclip-ray-gpus-{time.time_ns()}")

    def wait(self, timeout_s: float, say: Callable[[str], None], before_waiting: Callable[[], None] = lambda: None) -> None:
        """Block until every bundle is placed; ReservationTimeout after `timeout_s`. `before_waiting` runs first
        when the GPUs are not there at once."""
        import ray

        if self.group.wait(timeout_seconds=0):
            return
        have = float(ray.cluster_resources().get("GPU", 0.0))  # read first: GPUs may come while before_waiting runs
        before_waiting()
        started = time.monotonic()
        say(f"waiting for {self.gpus} GPU(s) ({have:g} in the cluster now; an autoscaler adds nodes for the rest), "
            f"up to {timeout_s:g} s")
        while True:
            left = timeout_s - (time.monotonic() - started)
            if left <= 0:
                have = float(ray.cluster_resources().get("GPU", 0.0))
                self.release()
                raise ReservationTimeout(
                    f"the cluster did not provide {self.gpus} GPU(s) with {self.bundle['CPU']:g} CPUs each within "
                    f"{timeout_s:g} s (it has {have:g} GPU(s)); check the autoscaler and node types, lower "
                    f"run.gpus, or raise run.gpu_wait_s")
            if self.group.wait(timeout_seconds=min(left, WAIT_REPORT_S)):
                say(f"got {self.gpus} GPU(s) after {time.monotonic() - started:.0f} s")
                return

    def probe(self, meanwhile: Callable[[], None] = lambda: None) -> list[dict]:
        """What the GPUs really are, one per node: node, CUDA's device name and memory (None without CUDA).
        `meanwhile` runs while the probes do (they start a worker process on each node)."""
        import ray
        from ray.util.placement_group import placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        nodes = placement_group_table(self.group).get("bundles_to_node_id", {}) or {0: None}
        first_on_node = sorted({node: int(index) for index, node in sorted(nodes.items(), reverse=True)}.values())
        probe = ray.remote(num_gpus=0.001, num_cpus=min(0.01, self.bundle["CPU"]))(_describe_gpu)
        probes = [probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=index)).remote() for index in first_on_node]
        meanwhile()
        return ray.get(probes)

    def pin(self, bundles: list[int], runtime_env: dict | None = None) -> Callable[[], dict]:
        """Ray Data's per-actor remote-args hook for a pool whose actors go to `bundles`, in start order.

        Ray Data calls it each time it starts an actor. The first len(bundles) calls get their bundle; a
        replacement for an actor that died while starting can go to any bundle with room, which is the dead
        actor's own (each GPU's shares are planned to leave no room for a second actor of a stage). The
        bundle index also travels in the actor's environment, so the actor can report where it runs.
        """
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        starts = itertools.count()
        base = dict(runtime_env or {})

        def remote_args() -> dict:
            i = next(starts)
            index = bundles[i] if i < len(bundles) else -1
            env = {**base, "env_vars": {**base.get("env_vars", {}), BUNDLE_ENV: str(index)}}
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.group,
                                                                            placement_group_bundle_index=index),
                    "runtime_env": env}

        return remote_args

    def release(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.group is not None and ray.is_initialized():
            try:
                remove_placement_group(self.group)
            except Exception:  # noqa: BLE001 - already gone with its cluster; nothing left to free
                pass
        self.group = None


GPU_DRIVER_FILES = ("/dev/nvidiactl", "/dev/kfd")
"""Device files of NVIDIA's driver and of AMD's (ROCm, which torch also reaches as CUDA): one exists wherever a GPU
can be used."""


def _describe_gpu() -> dict:
    import os
    import socket

    import ray

    info = {"node": socket.gethostname(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda": None,
            "memory_gb": None, "name": None}
    if not any(os.path.exists(path) for path in GPU_DRIVER_FILES):
        return info  # no GPU driver on this node, so nothing for torch to find; importing it takes seconds
    try:
        import torch

        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            info.update(cuda=True, name=properties.name, memory_gb=properties.total_memory / 2**30)
        elif os.path.exists("/dev/nvidiactl"):
            # A real NVIDIA GPU that torch cannot use (e.g. a driver older than the wheel's CUDA): computing on
            # the CPU instead would be silently ~100x slower and draw different numbers.
            info["cuda"] = f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use the GPU on this node"
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which fails the run with it
        info["cuda"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return info
