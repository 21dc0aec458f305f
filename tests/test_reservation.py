"""GPU reservation: bundles are waited for, a shortfall fails with one line, and actors land on their bundle."""

from __future__ import annotations

import pytest

from pipeline.reservation import GpuReservation, ReservationTimeout


def test_more_gpus_than_the_cluster_can_give_time_out_with_one_line_and_free_the_rest(ray_session):
    said, calls = [], []
    reservation = GpuReservation(3, 0.1)  # the session cluster has 2 GPUs and no autoscaler
    with pytest.raises(ReservationTimeout) as failure:
        reservation.wait(1.0, said.append, before_waiting=lambda: calls.append("confirmed the output claim"))
    assert calls == ["confirmed the output claim"], "a driver confirms its output claim before it waits for GPUs"
    message = str(failure.value)
    assert "did not provide 3 GPU(s)" in message and "run.gpu_wait_s" in message and "\n" not in message
    assert said and "waiting for 3 GPU(s)" in said[0]
    assert reservation.group is None, "a failed reservation holds nothing"
    ray = ray_session
    again = GpuReservation(2, 0.1)  # what the failed one asked for is free again
    again.wait(30.0, said.append)
    again.release()
    assert ray.is_initialized()


def test_pinned_actors_run_on_their_bundles_gpu(ray_session):
    ray = ray_session
    reservation = GpuReservation(2, 0.5)
    reservation.wait(30.0, print)
    try:
        @ray.remote(num_gpus=0.25, num_cpus=0.1)
        class Where:
            def where(self):
                from pipeline.progress import actor_location

                return actor_location()

        pin = reservation.pin([1, 0, 1], {"env_vars": {"KEPT": "yes"}})
        actors = [Where.options(**pin()).remote() for _ in range(3)]
        seen = ray.get([a.where.remote() for a in actors])
        assert [s["bundle"] for s in seen] == [1, 0, 1]
        assert seen[0]["gpu_ids"] == seen[2]["gpu_ids"] != seen[1]["gpu_ids"]
        extra = pin()  # a replacement beyond the planned actors may take any bundle with room
        assert extra["scheduling_strategy"].placement_group_bundle_index == -1
        assert extra["runtime_env"]["env_vars"]["KEPT"] == "yes", "the pool's own environment is kept"
        for actor in actors:
            ray.kill(actor)
    finally:
        reservation.release()


def test_the_output_claim_settles_while_the_gpus_are_probed_and_a_lost_claim_frees_them(ray_session):
    from pipeline.config import load_config
    from pipeline.lease import LeaseError
    from pipeline.plan import ClusterShape
    from pipeline.run import reserve_gpus

    config = load_config(None, ["models.unclip=/x", "run.gpus=2"], input_path="in", output_path="out")
    settled = []

    def settle():
        settled.append(True)
        raise LeaseError("output out is in use by another run")

    # The session's 2 GPUs are free, so nothing is waited for: the claim settles during the probe instead.
    with pytest.raises(LeaseError):
        reserve_gpus(config, ClusterShape(cpus=4, gpus=2), settle=settle)
    assert settled == [True]
    again = GpuReservation(2, 0.1)  # the losing driver let go of its GPUs at once
    try:
        again.wait(5.0, print)
    finally:
        again.release()



GPU_PROBE = r"""
import json, sys
import ray
from pipeline import reservation

ray.get_gpu_ids = lambda: ["0"]  # as in a task given a (fake) GPU; no Ray is started
seen = []
for driver_file in ("/nonexistent/nvidiactl", "/dev/null"):  # a node without a GPU driver, then one with
    reservation.GPU_DRIVER_FILES = (driver_file,)
    seen.append({"info": reservation._describe_gpu(), "torch_imported": "torch" in sys.modules})
print(json.dumps(seen))
"""


def test_the_gpu_probe_imports_torch_only_where_a_gpu_driver_is():
    """Each run probes its GPUs; on a node without a GPU driver there is no CUDA for torch to find, and importing
    torch would only add seconds to every run's start."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    without_driver, with_driver = json.loads(done.stdout.strip().splitlines()[-1])
    assert not without_driver["torch_imported"] and with_driver["torch_imported"]
    for probed in (without_driver, with_driver):  # no CUDA here either way
        assert probed["info"]["gpu_ids"] == ["0"] and probed["info"]["cuda"] is None, probed
