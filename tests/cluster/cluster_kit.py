"""A real multi-node Ray cluster on one machine, for the cluster tests.

Every node is its own `ray start --block` process group:

- the head on 127.0.0.2 (0 CPUs, the dashboard and Ray Jobs on 127.0.0.1);
- each worker on its own loopback address (127.0.0.3, .4, ...) inside its own mount
  namespace (`unshare --mount`), with a private tmpfs over every node-local path
  (local output folders, the base cache) and a private copy of Ray's temp folder, so
  a file written on one node is really absent on the others;
- workers declare logical GPUs (`--num-gpus`), so GPU scheduling and placement run
  for real while the computation stays on the CPU.

With multi-node enabled (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1) Ray would replace
127.0.0.1 by the machine's outward address; explicit 127.0.0.x node addresses are
kept, and `LocalCluster.nodes()` lets tests assert that. Nothing here calls `ray stop`:
each node is stopped by killing exactly the process group this kit started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP = "127.0.0.2"
NODE_LOCAL = "/tmp/tuneqdm-node-local"  # a private tmpfs on every worker node
OBJECT_STORE_BYTES = 80 * 2**20
AGENT_PORT_FLAGS = ("node-manager-port", "object-manager-port", "metrics-export-port",
                    "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                    "runtime-env-agent-port")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now and never returned before by this process: the OS
    may hand a just-closed port out again, and a node's components are given their
    ports before they bind them (Ray refuses a node whose two components share one)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def namespaces_available() -> str | None:
    """None if mount namespaces and tmpfs mounts can be made here, else the reason."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs tmpfs /mnt && umount /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a mount namespace with a tmpfs: {probe.stderr.strip()}"
    return None


@dataclass
class Node:
    ip: str
    process: subprocess.Popen
    log: Path
    gpus: int = 0
    cpus: int = 0
    metrics_port: int = 0  # the node's metrics agent: http://<ip>:<port>/metrics
    killed: bool = False   # killed on purpose (a test's node loss), not a failure

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the node's whole process group (raylet, workers, agents)."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@dataclass
class LocalCluster:
    """A head plus worker nodes under `root` (see the module docstring).

    node_local: absolute paths that each worker sees as its own empty tmpfs.
    """

    root: Path
    node_local: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    head: Node | None = None
    workers: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def node_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                    "RAY_raylet_start_wait_time_s": "180",
                    # metrics exported every second (default 10 s): a run's end waits one
                    # export interval for its final counts (pipeline/run.py)
                    "RAY_metrics_report_interval_ms": "1000"})
        env.update(self.env)
        return env

    # -- lifecycle ----------------------------------------------------------------------

    def start_head(self) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        command = [
            RAY, "start", "--head", "--block", f"--node-ip-address={HEAD_IP}",
            f"--port={self.gcs_port}", "--num-cpus=0", "--num-gpus=0",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
            f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}", *self._port_flags(ports := {})]
        self.head = self._spawn(command, HEAD_IP, "head")
        self.head.metrics_port = ports["metrics-export-port"]

    def add_worker(self, cpus: int = 1, gpus: int = 1, resources: dict | None = None) -> Node:
        """Start one more worker node on the next loopback address."""
        index = len(self.workers) + 1
        ip = f"127.0.0.{2 + index}"
        private_ray = self.root / f"node{index}-ray"
        private_ray.mkdir(parents=True, exist_ok=True)
        mounts = [f"mount --bind {private_ray} {self.temp_dir}"]
        for path in self.node_local:
            mounts.append(f"mkdir -p {path} && mount -t tmpfs -o size=512m tmpfs {path}")
        extra = f" --resources='{json.dumps(resources)}'" if resources else ""
        ray_cmd = " ".join([
            RAY, "start", "--block", f"--address={self.address}", f"--node-ip-address={ip}",
            f"--num-cpus={cpus}", f"--num-gpus={gpus}",
            f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
            f"--min-worker-port={21000 + 1000 * index}",
            f"--max-worker-port={21999 + 1000 * index}", *self._port_flags(ports := {})
        ]) + extra
        script = " && ".join([*mounts, f"exec {ray_cmd}"])
        node = self._spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            script], ip, f"node{index}")
        node.cpus, node.gpus = cpus, gpus
        node.metrics_port = ports["metrics-export-port"]
        self.workers.append(node)
        return node

    @staticmethod
    def _port_flags(ports: dict[str, int]) -> list[str]:
        """A free port for each agent flag; records them in `ports` (flag -> port)."""
        ports.update({flag: free_port() for flag in AGENT_PORT_FLAGS})
        return [f"--{flag}={port}" for flag, port in ports.items()]

    def _spawn(self, command: list[str], ip: str, name: str) -> Node:
        log = self.root / f"{name}.log"
        with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(command, env=self.node_env(), start_new_session=True,
                                       stdout=handle, stderr=subprocess.STDOUT)
        return Node(ip=ip, process=process, log=log)

    def live_workers(self) -> list[Node]:
        """The worker nodes not killed (by a test) and still running."""
        return [node for node in self.workers if not node.killed and node.alive()]

    def ensure_workers(self, count: int) -> list[Node]:
        """Start workers until `count` are live (a test may have killed some), wait
        until the cluster sees them all; returns the live workers."""
        while len(self.live_workers()) < count:
            self.check_processes()  # a worker that exited by itself is a failure
            self.add_worker()
        want = {HEAD_IP, *(node.ip for node in self.live_workers())}
        deadline = time.monotonic() + 240.0
        while True:  # by address: a killed node may still count as alive for a while
            self.check_processes()
            with contextlib.suppress(OSError, ValueError):
                alive = {n["node_ip"] for n in self.nodes() if n["state"] == "ALIVE"}
                if want <= alive:
                    return self.live_workers()
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {sorted(want)} not all alive after 240 s")
            time.sleep(1.0)

    def wait_for_nodes(self, count: int, timeout_s: float = 240.0) -> list[dict]:
        """Block until `count` nodes are alive (head included); returns them."""
        deadline = time.monotonic() + timeout_s
        nodes: list[dict] = []
        while time.monotonic() < deadline:
            self.check_processes()
            with contextlib.suppress(OSError, ValueError):
                nodes = [n for n in self.nodes() if n["state"] == "ALIVE"]
                if len(nodes) >= count:
                    return nodes
            time.sleep(1.0)
        raise TimeoutError(f"{len(nodes)} of {count} nodes alive after {timeout_s} s")

    def check_processes(self) -> None:
        """Raise if a node this kit started has exited without being killed."""
        for node in [self.head, *self.workers]:
            if node is not None and not node.killed and not node.alive():
                raise RuntimeError(f"node {node.ip} exited: {node.log.read_text()[-2000:]}")

    def metrics_text(self) -> str:
        """The Prometheus text of every live node's metrics agent, concatenated."""
        texts = []
        for node in [self.head, *self.workers]:
            if node is None or not node.alive():
                continue
            url = f"http://{node.ip}:{node.metrics_port}/metrics"
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    url, timeout=10) as response:
                texts.append(response.read().decode())
        return "\n".join(texts)

    def nodes(self) -> list[dict]:
        """Every node the cluster knows (state API through the dashboard)."""
        url = f"{self.dashboard_url}/api/v0/nodes?limit=100&detail=true"
        with urllib.request.urlopen(url, timeout=10) as response:
            payload = json.loads(response.read())
        return payload["data"]["result"]["result"]

    # -- Ray Jobs (drivers run on the head) ----------------------------------------------

    def submit_job(self, entrypoint: str, runtime_env: dict | None = None) -> str:
        """Submit `entrypoint` as a Ray Job on the head; returns the job id. Retries
        for up to a minute while the head answers "No available agent to submit job"
        (its job agent is still starting: seen on a loaded machine)."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url)
        deadline = time.monotonic() + 60.0
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            except RuntimeError as err:
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(2.0)

    def wait_job(self, job_id: str, timeout_s: float = 300.0,
                 until: Callable[[str], bool] | None = None) -> tuple[str, str]:
        """Poll the job until it ends (or `until(logs)` holds); returns (status, logs)."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return str(status.value), logs
            if until is not None and until(logs):
                return str(status.value), logs
            time.sleep(1.0)
        client.stop_job(job_id)
        raise TimeoutError(f"job {job_id} still running after {timeout_s} s; logs:\n"
                           f"{client.get_job_logs(job_id)[-3000:]}")

    def stop(self) -> None:
        """Kill every node this cluster started, workers first, and remove the
        ray_current_cluster file the head wrote into our temp folder."""
        for node in [*self.workers, self.head]:
            if node is not None:
                node.kill()
        with contextlib.suppress(FileNotFoundError):
            (self.temp_dir / "ray_current_cluster").unlink()


def start_cluster(root: Path, workers: int = 2, node_local: list[str] | None = None,
                  env: dict[str, str] | None = None, gpus_per_worker: int = 1) -> LocalCluster:
    """Start a head and `workers` workers and wait until all are alive."""
    cluster = LocalCluster(root=root, node_local=list(node_local or []), env=dict(env or {}))
    try:
        for attempt in range(3):  # a free port can be taken by another process meanwhile
            cluster.start_head()
            try:
                cluster.wait_for_nodes(1)
                break
            except RuntimeError:
                cluster.head.kill()
                if attempt == 2:
                    raise
        for _ in range(workers):
            cluster.add_worker(cpus=1, gpus=gpus_per_worker)
        cluster.wait_for_nodes(1 + workers)
    except BaseException:
        cluster.stop()
        raise
    return cluster
