"""Chaos helper run in its own process: a multi-node Ray on this machine loses the node holding the stage actors.

Usage: python -m tests.node_loss_run CONFIG_JSON. Starts a CPU head and one GPU worker node (fake GPUs),
runs the job, and once some shards are committed adds a replacement GPU node (as an autoscaler would) and
removes the first one. Prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from pipeline.config import load_config
from pipeline.run import generate


T0 = time.time()


def main() -> None:
    args = json.loads(sys.argv[1])
    node = {"object_store_memory": 200 * 1024 * 1024}
    # A lost node is declared dead after 3 missed health checks 1 s apart (Ray: 5, 3 s apart), so the test waits
    # less for what it checks: the run goes on without it.
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 2, "num_gpus": 0,
                                                            "_system_config": health})
    doomed = cluster.add_node(**node, num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    config = load_config(None, args["sets"], input_path=args["input"], output_path=args["output"])
    events = {}

    outcome = {}

    def run() -> None:  # the job runs beside; node changes must happen on the main thread (signal handlers)
        started = time.time()
        try:
            outcome["summary"] = generate(config).summary
        except BaseException as exc:  # noqa: BLE001 - reported to the parent test
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        outcome["wall_s"] = round(time.time() - started, 1)
        outcome["ended_at"] = round(time.time() - T0, 1)

    job = threading.Thread(target=run, daemon=True)
    job.start()
    metadata = os.path.join(args["output"], "metadata")
    deadline = time.time() + 240
    while time.time() < deadline and job.is_alive():
        if os.path.isdir(metadata) and len([p for p in os.listdir(metadata) if p.endswith(".parquet")]) >= 2:
            break
        time.sleep(0.5)
    events["committed_before_loss"] = len(os.listdir(metadata)) if os.path.isdir(metadata) else 0
    if job.is_alive():
        cluster.add_node(**node, num_cpus=2, num_gpus=1)
        cluster.remove_node(doomed, allow_graceful=False)
        events["removed_node"] = doomed.node_id
        events["removed_at"] = round(time.time() - T0, 1)
    job.join(timeout=300)
    events.update(counts=outcome.get("summary", {}).get("counts"), error=outcome.get("error"),
                  wall_s=outcome.get("wall_s"), ended_at=outcome.get("ended_at"),
                  nodes_alive=len([n for n in ray.nodes() if n["Alive"]]))
    print("RESULT " + json.dumps(events), flush=True)
    ray.shutdown()
    cluster.shutdown()
    os._exit(0)  # skip Ray's atexit hooks for nodes already removed


if __name__ == "__main__":
    main()
