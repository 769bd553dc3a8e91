"""A cluster on one machine for the tests: an S3-compatible server and a multi-node Ray cluster.

- `S3Server`: moto's standalone S3 server (a subprocess on 127.0.0.1, a free port), reached the standard way
  (`AWS_ENDPOINT_URL` + credential variables); its request log shows what every client read.
- `RayCluster`: `ray start --head` plus `ray start --address` worker nodes, each a separate raylet with its
  own temp dir, ports and a custom resource naming it. Teardown kills only the processes of this cluster
  (found by its temp dirs), never other Ray clusters on the machine (`ray stop` would stop them all).
- `RayCluster.start_autoscaling_head`: a head whose worker nodes Ray's own autoscaler launches and removes,
  through Ray's fake multi-node provider (`fake_autoscaling_config`: a shipped cluster file's node types).

The same commands a user runs on a real cluster; only the endpoint differs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RAY = str(Path(PYTHON).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """`predicate()`'s first truthy value, polled every `interval` seconds; TimeoutError after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# ---- S3 ------------------------------------------------------------------------------------------
@dataclass
class S3Server:
    endpoint: str
    bucket: str
    log: Path
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "") -> dict[str, int]:
        """key -> size of every object under `prefix`."""
        out: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return out

    def log_mark(self) -> int:
        return self.log.stat().st_size

    def gets_since(self, mark: int) -> list[str]:
        """Keys of the GET requests (object reads) the server answered since `mark`."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_bytes()[mark:].decode(errors="replace"))  # colours
        keys = re.findall(rf'"GET /{re.escape(self.bucket)}/([^ ?]+)[^ ]* HTTP/1\.1" 20[06]', text)
        return keys

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_s3(tmp: Path, bucket: str = "raymed-test") -> S3Server:
    port = free_port()
    log = tmp / "moto.log"
    proc = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    server = S3Server(endpoint, bucket, log, proc, env)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_until(up, 60, "the S3 server")
    server.client().create_bucket(Bucket=bucket)
    return server


# ---- Ray -----------------------------------------------------------------------------------------
@dataclass
class Node:
    name: str
    temp_dir: Path
    node_id: str | None = None


@dataclass
class RayCluster:
    root: Path
    env: dict[str, str]
    port: int = 0
    dashboard_port: int = 0
    nodes: list[Node] = field(default_factory=list)
    caches: Path | None = None
    """When set, every node has its own Hugging Face cache `caches/<node name>` (HF_HOME): no shared folder."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def start_head(self, cpus: float, resources: dict[str, float] | None = None) -> Node:
        self.port, self.dashboard_port = free_port(), free_port()
        node = Node("head", Path(tempfile.mkdtemp(prefix="rmc-h-", dir="/tmp")))
        cmd = [RAY, "start", "--head", f"--port={self.port}", f"--num-cpus={cpus:g}", f"--temp-dir={node.temp_dir}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
               f"--resources={json.dumps({'node_head': 1, **(resources or {})})}", *self._ports()]
        self._run(cmd, node)
        self.nodes.append(node)
        node.node_id = self._node_id("node_head")
        return node

    def start_autoscaling_head(self, config: dict[str, Any]) -> Node:
        """A head (no CPUs: drivers only) run with Ray's autoscaler on its fake multi-node provider
        (`fake_autoscaling_config`): worker nodes are raylets the autoscaler starts for pending work and stops
        when idle. They share the head's temp dir (so `processes()` and `shutdown()` find them)."""
        self.port, self.dashboard_port = free_port(), free_port()
        node = Node("head", Path(tempfile.mkdtemp(prefix="rmc-a-", dir="/tmp")))
        config = {**config, "provider": {**config["provider"], "gcs_address": self.address}}
        (node.temp_dir / "autoscaling.yaml").write_text(yaml.safe_dump(config))
        cmd = [RAY, "start", "--head", f"--port={self.port}", "--num-cpus=0", f"--temp-dir={node.temp_dir}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
               f"--autoscaling-config={node.temp_dir / 'autoscaling.yaml'}", *self._ports()]
        # the provider's head is FAKE_HEAD_ID of type ray.head.default; the autoscaler acts every second
        self._run(cmd, node, {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                              "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID, "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID})
        self.nodes.append(node)
        node.node_id = FAKE_HEAD_ID
        return node

    def node_table(self) -> list[dict[str, Any]]:
        """Ray's own record of the cluster's nodes, live and dead (`ray.nodes()`), asked from a client process."""
        code = ("import json, ray; ray.init(address='%s', logging_level='error'); "
                "print('NODES', json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'Resources')} for n in ray.nodes()]))"
                % self.address)
        out = subprocess.run([PYTHON, "-c", code], env={**os.environ, **self.env, "RAY_SCHEDULER_EVENTS": "0"},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("NODES "))[6:])

    def add_node(self, name: str, cpus: float) -> Node:
        """A worker node (a separate raylet) with the custom resource `node_<name>`."""
        node = Node(name, Path(tempfile.mkdtemp(prefix=f"rmc-{name}-", dir="/tmp")))
        cmd = [RAY, "start", f"--address={self.address}", f"--num-cpus={cpus:g}", f"--temp-dir={node.temp_dir}",
               "--disable-usage-stats", f"--resources={json.dumps({f'node_{name}': 1})}", *self._ports()]
        self.nodes.append(node)
        self._run(cmd, node)
        node.node_id = self._node_id(f"node_{name}")
        return node

    def _run(self, cmd: list[str], node: Node, extra_env: dict[str, str] | None = None) -> None:
        env = {**os.environ, **self.env, **({"HF_HOME": str(self.caches / node.name)} if self.caches else {}),
               **(extra_env or {})}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def _node_id(self, resource: str) -> str:
        code = ("import json, ray; ray.init(address='%s', logging_level='error'); "
                "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and %r in n['Resources']]))"
                % (self.address, resource))

        def found() -> str | None:
            out = subprocess.run([PYTHON, "-c", code], env={**os.environ, **self.env}, capture_output=True,
                                 text=True, timeout=120)
            ids = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []
            return ids[0] if ids else None

        return wait_until(found, 120, f"node with resource {resource}", interval=1.0)

    def processes(self, node: Node | None = None) -> list[psutil.Process]:
        """Processes of this cluster (or of one node): those whose command line names its temp dir."""
        dirs = [str(n.temp_dir) for n in ([node] if node else self.nodes)]
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if any(d in cmdline for d in dirs):
                found[p.pid] = p
                try:  # the raylet's workers and agents
                    found.update({c.pid: c for c in p.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())

    def kill_node(self, node: Node) -> int:
        """SIGKILL every process of a node (raylet, object store, workers): a lost machine, not a stop."""
        procs = self.processes(node)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.nodes.remove(node)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        return len(procs)

    def shutdown(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for n in self.nodes:
            shutil.rmtree(n.temp_dir, ignore_errors=True)
        self.nodes.clear()


# ---- Ray's autoscaler on one machine --------------------------------------------------------------------------
FAKE_HEAD_ID = "f" * 51 + "00000"  # ray.autoscaler._private.fake_multi_node.node_provider.FAKE_HEAD_NODE_ID


def fake_autoscaling_config(shipped: Path, worker_cpus: float, max_workers: int, idle_minutes: float,
                            spot_dir: Path) -> dict:
    """A shipped cluster file (`cluster/aws.yaml`) on Ray's fake multi-node provider, scaled to this machine: its
    first GPU worker type (same name, `min_workers` as shipped: 0) with `worker_cpus` CPUs and no GPU, at most
    `max_workers` of it; the idle timeout shortened to `idle_minutes`; a head without CPUs. The provider is Ray's
    fake one run as a spot market (`tests.fixtures.spot_cloud.SpotCloud`, driven through `spot_dir`), with the
    settings of Ray's own example (ray/autoscaler/_private/fake_multi_node/example.yaml, not in the wheel): nodes
    are raylets on this machine, no SSH, no updaters."""
    cfg = yaml.safe_load(shipped.read_text())
    head = cfg["head_node_type"]
    name, kind = next((n, t) for n, t in cfg["available_node_types"].items()
                      if n != head and t.get("max_workers", 0) > 0 and t["resources"].get("GPU"))
    return {
        "cluster_name": cfg["cluster_name"], "max_workers": max_workers, "upscaling_speed": cfg["upscaling_speed"],
        "idle_timeout_minutes": idle_minutes,
        "provider": {"type": "external", "module": "tests.fixtures.spot_cloud.SpotCloud", "spot_dir": str(spot_dir),
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            name: {"min_workers": kind.get("min_workers", 0), "max_workers": max_workers,
                   "resources": {"CPU": worker_cpus}, "node_config": {}},
        },
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def run_job_command(cmd: list[str], deadline_s: float = 600, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a `ray job ...` command, again while the head answers "No available agent to submit job, please try
    again later": its job agent registers some seconds after the dashboard answers (longer on a loaded machine)."""
    end = time.time() + deadline_s
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > end:
            return proc
        time.sleep(3)


def cluster_env(s3: S3Server) -> dict[str, str]:
    """Environment of the cluster's processes and of the clients: object storage, token auth, quiet logs,
    this checkout importable on every node."""
    return {**s3.env, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO),
            "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` of jobs: this env
            "TRANSFORMERS_VERBOSITY": "error", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_DEDUP_LOGS": "0"}


def job_logs(cluster: RayCluster, env: dict[str, str]) -> str:
    """Status and log tail of every job on the cluster (for assertion messages)."""
    code = ("from ray.job_submission import JobSubmissionClient as C; c = C(%r)\n"
            "for j in c.list_jobs():\n if j.submission_id: print(j.submission_id, j.status, c.get_job_logs(j.submission_id)[-5000:])"
            % cluster.dashboard)
    done = subprocess.run([PYTHON, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr[-2000:]


def run_cli(module: str, args: list[str], env: dict[str, str], timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` as a user would run it, against the cluster in `env`."""
    done = subprocess.run([PYTHON, "-m", module, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if check and done.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done
