"""Ray's own autoscaler, on one machine: the shipped cluster file's shape on Ray's fake multi-node provider.

The head runs `ray start --head --autoscaling-config=...` with the worker type of `cluster/aws.yaml` (`gpu_a10g`,
`min_workers: 0`), scaled to this machine (2 CPUs a node instead of a GPU, at most 2 nodes, a 12-second idle
timeout instead of 10 minutes) and no CPUs on the head, so every trial and worker needs a node the autoscaler
launches. Ray's autoscaler (its monitor process, the same code as on a cloud) starts worker nodes as raylets on
this machine and stops them when idle; storage and data are on a local S3-API server (no folder is shared by
design: the nodes happen to be one machine).

- A `ray job submit` sweep on the empty cluster: the autoscaler launches nodes for the pending trials, each trial
  trains on a launched node (its result row records the node), and the idle nodes are removed afterwards.

In the `slow` tier (`python -m pytest -m slow tests/test_autoscaling.py`, ~5 minutes here): CI runs at 80 of its
90 minutes. Not here: a node lost under a running elastic group with the autoscaler replacing it (tried: a
2-worker tiny-llava run on two fake nodes trained 2 epochs in 8 minutes on this 2-core machine, too slow to finish
a loss and a regrowth; docs/cluster.md).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cluster_fixtures import (FAKE_HEAD_ID, PYTHON, REPO, RayCluster, S3Server, cluster_env,
                                    fake_autoscaling_config, job_logs, run_cli, run_job_command, wait_until)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHIPPED = REPO / "cluster" / "aws.yaml"
NODE_CPUS, MAX_NODES, IDLE_MINUTES = 2, 2, 0.2


@pytest.fixture(scope="module")
def cluster(s3) -> RayCluster:
    ray_cluster = RayCluster(root=Path("/tmp"), env=cluster_env(s3))
    config = fake_autoscaling_config(SHIPPED, NODE_CPUS, MAX_NODES, IDLE_MINUTES)
    try:
        head = ray_cluster.start_autoscaling_head(config)
        # the shipped file's own head start command that records the node types, on this cluster's file
        command = next(c for c in yaml.safe_load(SHIPPED.read_text())["head_start_ray_commands"]
                       if "raymed.cluster" in c).replace("~/ray_bootstrap_config.yaml", str(head.temp_dir / "autoscaling.yaml"))
        done = subprocess.run(["bash", "-c", command], env={**os.environ, **ray_cluster.env, "RAY_ADDRESS": ray_cluster.address},
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert done.returncode == 0 and "gpu_a10g" in done.stdout, done.stdout + done.stderr[-3000:]
        yield ray_cluster
    finally:
        ray_cluster.shutdown()


@pytest.fixture(scope="module")
def dataset(s3, tmp_path_factory) -> str:
    """Synthetic Med-VQA prepared straight to S3 with the CLI (40 images)."""
    raw = tmp_path_factory.mktemp("raw")
    env = cluster_env(s3)
    run_cli("raymed.data", ["synth", "--out", str(raw), "--n", "40", "--seed", "0"], env)
    uri = s3.uri("data", "synth")
    run_cli("raymed.data", ["prepare", "--format", "vqa-rad", "--input", str(raw), "--out", uri], env)
    return uri


def launched(cluster: RayCluster) -> list[dict]:
    """The nodes Ray records besides the head (the autoscaler's), live and dead."""
    return [n for n in cluster.node_table() if n["NodeID"] != FAKE_HEAD_ID]


def s3_json(s3: S3Server, key: str) -> dict:
    return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())


def test_a_sweep_scales_up_from_zero_nodes_and_down_when_idle(s3, cluster, dataset):
    assert launched(cluster) == [], "the cluster starts with no worker node"
    args = ["--config", "configs/sweeps/tiny-cpu.yaml", "--out", s3.uri("auto"), f"data.path={dataset}",
            "train.epochs=1", "scaling.cpus_per_worker=1"]  # 1.55 CPUs a trial: one trial a 2-CPU node
    # The fake nodes share the head's session folder, where Ray unpacks a job's `--working-dir` package; the
    # autoscaler stopping a node removes it under the running driver. So the job runs from this checkout
    # (tests/test_cluster_s3.py submits with --working-dir to separate raylets).
    entry = f"cd {shlex.quote(str(REPO))} && exec python -m raymed.tune {shlex.join(args)}"
    done = run_job_command([str(Path(PYTHON).parent / "ray"), "job", "submit", "--address", cluster.dashboard,
                            "--", "bash", "-c", entry],
                           env={**os.environ, **cluster_env(s3)}, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:] + job_logs(cluster, cluster_env(s3))
    assert "autoscaling cluster" in done.stdout + done.stderr  # raymed saw the node types it can launch

    nodes = {n["NodeID"]: n for n in launched(cluster)}
    assert 1 <= len(nodes) <= MAX_NODES and all(n["Resources"].get("CPU") == NODE_CPUS for n in nodes.values()
                                                 if n["Alive"]), nodes
    trials = s3_json(s3, "auto/tiny-cpu/results.json")["trials"]
    assert sorted(t["method"] for t in trials) == ["ln", "lora"] and not any(t.get("error") for t in trials)
    for trial in trials:
        ran_on = set(trial["history"][-1]["worker_nodes"])
        assert ran_on and ran_on <= set(nodes), (trial["trial_id"], ran_on, sorted(nodes))  # never the head
    print(f"autoscaler launched {len(nodes)} node(s): {sorted(nodes)}")

    try:
        wait_until(lambda: not any(n["Alive"] for n in launched(cluster)), 180, "the idle nodes to be removed",
                   interval=2.0)
    except TimeoutError as err:
        status = subprocess.run([str(Path(PYTHON).parent / "ray"), "status", "-v", "--address", cluster.address],
                                env={**os.environ, **cluster.env}, capture_output=True, text=True, timeout=120)
        actors = subprocess.run([str(Path(PYTHON).parent / "ray"), "list", "actors", "--filter", "state=ALIVE",
                                 "--address", cluster.dashboard], env={**os.environ, **cluster.env},
                                capture_output=True, text=True, timeout=120)
        raise AssertionError(f"{err}\n{launched(cluster)}\n{status.stdout[-6000:]}\n{actors.stdout[-4000:]}") from None
