"""Ray job submission against a real local head (`ray start --head`, token auth on), stopped by its process id."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs.submit import _replace_option, run_submission_id
from tests.conftest import FAST_STEPS, model_overrides, write_prompts

PORT_OPTIONS = ("--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
                "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                "--metrics-export-port", "--runtime-env-agent-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env() -> dict[str, str]:
    # As a user's shell would be: no auth mode set, so the product must find the token by itself.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def ray_head(model_cache):
    """A separate Ray head on this machine with its dashboard (the Jobs API); yields the dashboard URL."""
    ports = {option: free_port() for option in PORT_OPTIONS}
    # Short temp dir: Ray's socket paths must stay under the OS limit of ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=4", "--num-gpus=0",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
               "--disable-usage-stats", *(f"{option}={port}" for option, port in ports.items())]
    head = subprocess.Popen(command, env=client_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        wait_for_jobs_api(address, head)
        yield address
    finally:
        # SIGTERM reaches the head's processes (its own session); `ray start --block` itself may linger on it.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def wait_for_jobs_api(address: str, head: subprocess.Popen, timeout_s: float = 90.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token: auth is on, as it should be)
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {address} after {timeout_s}s")


def submit(address: str, *generate_args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.submit", "--address", address, "--", *generate_args],
                          env=client_env(), capture_output=True, text=True, timeout=420,
                          cwd=Path(__file__).resolve().parent.parent)


FUSED = ["run.fuse_stages=true"]
"""The job is about submission, not placement: one CPU actor runs every stage (the head has no GPUs)."""


def test_submit_runs_the_job_on_the_head_and_exits_with_its_status(tiny_models, ray_head, tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", ["a red fox", "a blue bird", "a green frog"])
    output = tmp_path / "out"
    sets = [arg for s in FAST_STEPS + model_overrides(tiny_models, upsampler_1024=False, clip=False) + FUSED
            for arg in ("--set", s)]
    first = submit(ray_head, "--input", prompts, "--output", str(output), *sets)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    expected_id = run_submission_id(str(output), "")
    assert f"submitted {expected_id} " in first.stdout
    assert "done: 3 ok" in first.stdout  # the job's own log, followed
    assert first.stdout.rstrip().endswith(f"job {expected_id}: SUCCEEDED")
    summary = json.loads((output / "_SUCCESS.json").read_text())
    assert summary["counts"]["ok"] == 3 and len(list((output / "images").iterdir())) == 3

    # The same run again, now failing on the cluster (its model is gone): a new attempt id (Ray keeps the old
    # one), and the job's failure makes the submitter fail too, without a traceback of its own.
    failing = submit(ray_head, "--input", prompts, "--output", str(output), *sets,
                     "--set", f"models.unclip={tmp_path / 'nowhere'}")
    assert f"submitted {expected_id}-attempt2 " in failing.stdout
    assert failing.returncode != 0 and f"job {expected_id}-attempt2: FAILED" in failing.stdout + failing.stderr
    assert "Traceback" not in failing.stderr


def test_bad_run_arguments_fail_here_before_anything_is_uploaded(tmp_path):
    # An unreachable address proves nothing was contacted: the config error comes first.
    result = submit("http://127.0.0.1:9", "--input", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "o"),
                    "--set", "stages.decoder.steps=-1")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "steps" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_window_auto_is_pinned_before_submission():
    args = _replace_option(["--input", "in/{window}", "--window", "auto", "--set", "a=b"], "--window", "2026-11-24")
    assert args == ["--input", "in/{window}", "--window", "2026-11-24", "--set", "a=b"]
    assert run_submission_id("s3://b/out/2026-11-24", "2026-11-24").startswith("unclip-2026-11-24-")
    assert run_submission_id("s3://b/x", "") != run_submission_id("s3://b/y", "")
