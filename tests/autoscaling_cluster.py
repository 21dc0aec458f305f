"""A private Ray cluster on this machine whose real autoscaler launches fake GPU worker nodes, for tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_NODE_TYPE = "ray.head.default"  # the fake provider tags the head with this type; the config must agree
GPU_NODE_TYPE = "ray.worker.gpu"
READY_MARKS = ("Autoscaler status", "Using Autoscaling Config")  # monitor.log: v1 after its first update, v2
OBJECT_STORE_BYTES = 100 * 1024**2  # per node: small, so several fake nodes fit in /dev/shm beside real ones


def _free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out, all distinct (held open together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[3])


def is_alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its parent to reap it does not)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def _proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class AutoscalingFakeCluster:
    """A head with CPUs only plus one GPU node type (min 0 workers) that Ray's own autoscaler adds on demand.

    The worker nodes are real raylets on this machine with fake GPUs (the ``fake_multinode`` provider). The
    cluster has its own ports, temp dir and auth token, and runs in its own session: stopping it signals only
    the processes of that session (head, autoscaler monitor, fake workers and everything they spawned), so a
    ``ray.init()`` cluster of the calling process, or anyone else's Ray, is left alone. The calling process
    never connects to it; drivers run as subprocesses with ``env`` (address and token)::

        with AutoscalingFakeCluster(gpu_worker={"cpus": 2, "gpus": 1, "max_workers": 2}) as cluster:
            subprocess.run([sys.executable, "driver.py"], env=cluster.env, check=True)
    """

    def __init__(self, head_cpus: int = 2, gpu_worker: dict | None = None, idle_timeout_minutes: float = 1.0,
                 update_interval_s: int = 1, max_workers: int | None = None, autoscaler_v2: bool = False,
                 start_timeout_s: float = 120.0, start_attempts: int = 2):
        """``gpu_worker`` keys: cpus, gpus, max_workers, and optionally min_workers, accelerator_type (adds the
        ``accelerator_type:<name>`` resource a real GPU node reports) and resources (extra custom resources).
        ``max_workers`` caps the worker count over all node types (the node type's own cap by default).
        ``start_attempts``: a loaded machine can push the head's raylet past Ray's fixed 30 s registration wait;
        a failed start is cleaned up and tried again this many times in all."""
        gpu_worker = {"cpus": 2, "gpus": 1, "max_workers": 2, **(gpu_worker or {})}
        self.head_cpus = head_cpus
        self.gpu_worker = gpu_worker
        self.idle_timeout_minutes = idle_timeout_minutes
        self.update_interval_s = update_interval_s
        self.max_workers = gpu_worker["max_workers"] if max_workers is None else max_workers
        self.autoscaler_v2 = autoscaler_v2
        self.start_timeout_s = start_timeout_s
        self.start_attempts = start_attempts
        self.temp_dir: str | None = None
        self.address: str | None = None
        self.env: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._session_id: int | None = None
        self._starter: subprocess.Popen | None = None

    # -- configuration -------------------------------------------------------------------------------------

    def node_types(self) -> dict:
        """The autoscaler's ``available_node_types``: the head (CPUs only) and the GPU worker type."""
        worker = self.gpu_worker
        resources = {"CPU": worker["cpus"], "GPU": worker["gpus"], "object_store_memory": OBJECT_STORE_BYTES,
                     **worker.get("resources", {})}
        if worker.get("accelerator_type"):
            resources[f"accelerator_type:{worker['accelerator_type']}"] = 1
        return {
            HEAD_NODE_TYPE: {"resources": {"CPU": self.head_cpus, "GPU": 0}, "node_config": {}, "max_workers": 0},
            GPU_NODE_TYPE: {"resources": resources, "node_config": {}, "min_workers": worker.get("min_workers", 0),
                            "max_workers": worker["max_workers"]},
        }

    def _provider_type(self) -> dict:
        """``fake_multinode``; for autoscaler v2 the same class loaded as an ``external`` provider, because v2
        fills in defaults from the provider's example.yaml, which the Ray wheel does not ship."""
        if not self.autoscaler_v2:
            return {"type": "fake_multinode"}
        return {"type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"}

    def autoscaling_config(self, gcs_address: str) -> dict:
        """The cluster config ``ray start --autoscaling-config`` reads (fake_multinode provider, no SSH)."""
        return {
            "cluster_name": f"fake-{os.path.basename(self.temp_dir or 'cluster')}",
            "max_workers": self.max_workers,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {
                **self._provider_type(),
                "gcs_address": gcs_address,  # worker raylets join this head, not the default port 6379
                "launch_multiple": True,  # one call launches every node asked for, not one per update
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,  # fake nodes are up to date at birth: no SSH, no setup commands
                "disable_launch_config_check": True,
            },
            "auth": {},
            "docker": {},
            "available_node_types": self.node_types(),
            "head_node_type": HEAD_NODE_TYPE,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> AutoscalingFakeCluster:
        """Start the head and its autoscaler; returns once the head accepts drivers and the autoscaler runs."""
        started = time.monotonic()
        for attempt in range(1, self.start_attempts + 1):
            try:
                self._start_once(started)
                break
            except RuntimeError:
                self.stop()
                if attempt == self.start_attempts:
                    raise
        self.timings["start_s"] = time.monotonic() - started
        return self

    def _start_once(self, started: float) -> None:
        from ray._private.services import get_node_ip_address

        # Short: Unix socket paths under <temp>/session_*/sockets must stay within 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rayfake-", dir="/tmp")
        (gcs_port, client_port, dashboard_port, agent_port, agent_grpc_port, env_agent_port, metrics_port,
         monitor_metrics_port) = _free_ports(8)
        self.address = f"{get_node_ip_address()}:{gcs_port}"
        config_path = Path(self.temp_dir, "autoscaling.yaml")
        config_path.write_text(json.dumps(self.autoscaling_config(self.address), indent=1))
        token_path = Path(self.temp_dir, "auth_token")
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)

        # Drivers need the address and this cluster's token; nothing is written to ~/.ray.
        client = {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
        base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env = {**base, **client}
        head_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
                    "RAY_FAKE_CLUSTER": "1",  # the fake_multinode provider refuses to run without it
                    "AUTOSCALER_UPDATE_INTERVAL_S": str(self.update_interval_s),
                    "AUTOSCALER_METRIC_PORT": str(monitor_metrics_port),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        if self.autoscaler_v2:
            # v2 matches Ray nodes to provider instances by id: the head must carry the provider's head id.
            from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

            head_env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                             "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
        command = [ray_cli, "start", "--head", f"--temp-dir={self.temp_dir}", f"--port={gcs_port}",
                   f"--autoscaling-config={config_path}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
                   f"--object-store-memory={OBJECT_STORE_BYTES}", "--include-dashboard=false",
                   f"--dashboard-port={dashboard_port}",
                   f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
                   f"--dashboard-agent-grpc-port={agent_grpc_port}", f"--runtime-env-agent-port={env_agent_port}",
                   f"--metrics-export-port={metrics_port}", "--min-worker-port=0", "--max-worker-port=0",
                   "--disable-usage-stats"]
        log_path = Path(self.temp_dir, "ray-start.log")
        with open(log_path, "wb") as log:
            # A new session: every process the head, the monitor and the fake nodes spawn stays in it (Ray only
            # ever makes new process groups), which is how stop() finds them all and nothing else.
            starter = subprocess.Popen(command, env=head_env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self._session_id, self._starter = starter.pid, starter
        try:
            code = starter.wait(timeout=self.start_timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            output = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"ray start --head failed (exit {code}):\n{output}")
        self.timings["head_s"] = time.monotonic() - started
        self._wait_for_autoscaler(time.monotonic() + self.start_timeout_s)

    def _wait_for_autoscaler(self, deadline: float) -> None:
        """Until the monitor has loaded its config (v2) or run a first update (v1), as its log shows."""
        log = Path(self.temp_dir, "session_latest", "logs", "monitor.log")
        while time.monotonic() < deadline:
            if log.exists() and any(mark in log.read_text(errors="replace") for mark in READY_MARKS):
                return
            time.sleep(0.2)
        text = log.read_text(errors="replace")[-4000:] if log.exists() else "(no monitor.log)"
        raise RuntimeError(f"the autoscaler did not start:\n{text}")

    def processes(self) -> dict[int, str]:
        """This cluster's live processes (pid -> command line): its session, plus anything naming its temp dir."""
        found = {}
        if self._session_id is None:
            return found
        for pid in _all_pids():
            stat = _proc_stat(pid)
            if stat is None or stat[0] == "Z" or pid == os.getpid():
                continue
            cmdline = _proc_cmdline(pid)
            if stat[1] == self._session_id or (self.temp_dir and self.temp_dir + "/" in cmdline):
                found[pid] = cmdline
        return found

    def worker_nodes_running(self) -> int:
        """How many fake worker nodes are up now (one raylet each, besides the head's)."""
        raylets = sum(cmd.split(" ", 1)[0].endswith("/raylet") for cmd in self.processes().values())
        return max(raylets - 1, 0)

    def run_driver(self, source: str, *args: str, timeout: float = 180.0) -> dict:
        """Run Python ``source`` as a driver of this cluster (repo root as cwd) and return the JSON object its
        last line of output prints; a failing driver raises with its stderr and the autoscaler's log."""
        repo = Path(__file__).resolve().parent.parent
        done = subprocess.run([sys.executable, "-c", source, *args], cwd=repo, env=self.env, timeout=timeout,
                              capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"driver exited {done.returncode}:\n{done.stderr[-3000:]}\n"
                               f"--- monitor.log ---\n{self.monitor_log()[-3000:]}")
        return json.loads(lines[-1])

    def stop(self, grace_s: float = 1.0) -> None:
        """Terminate every process of this cluster (TERM, then KILL after ``grace_s``); raise if any survive.

        The GCS server and raylets take about 10 s to act on SIGTERM; a throwaway test cluster needs no graceful
        shutdown, so KILL follows soon."""
        started = time.monotonic()
        if self._session_id is not None:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                for pid in self.processes():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + wait_s
                while self.processes() and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not self.processes():
                    break
            if self._starter is not None:
                self._starter.wait(timeout=10)  # reap `ray start` if it was still running
            left = self.processes()
            if left:
                raise RuntimeError(f"processes of the fake cluster survived SIGKILL: {left}")
            self._session_id = self._starter = None
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.timings["stop_s"] = time.monotonic() - started

    def __enter__(self) -> AutoscalingFakeCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def monitor_log(self) -> str:
        """The autoscaler's log so far (for failure messages)."""
        log = Path(self.temp_dir or "", "session_latest", "logs", "monitor.log")
        return log.read_text(errors="replace") if log.exists() else ""

