"""Ray's own autoscaler, on one machine: the shipped cluster file's shape on Ray's fake multi-node provider.

The head runs `ray start --head --autoscaling-config=...` with the worker type of `cluster/aws.yaml` (`gpu_a10g`,
`min_workers: 0`), scaled to this machine (4 CPUs a node instead of a GPU, at most 2 nodes, a 12-second idle
timeout instead of 10 minutes) and no CPUs on the head, so every trial and worker needs a node the autoscaler
launches. Ray's autoscaler (its monitor process, the same code as on a cloud) starts worker nodes as raylets on
this machine and stops them when idle, through Ray's fake provider run as a spot market
(`tests.fixtures.spot_cloud`: the test can take a node back and hold launches until capacity returns); storage
and data are on a local S3-API server (no folder is shared by design: the nodes happen to be one machine).
Each trial or worker asks for more than half a node's CPUs, so one fits a node, as one per GPU would.

- A `ray job submit` sweep on the empty cluster: the autoscaler launches nodes for the pending trials, each trial
  trains on a launched node (its result row records the node), and the idle nodes are removed afterwards.
- An elastic run (`scaling.num_workers: [1, 2]`) loses a node to the spot market while it trains: it shrinks to one
  worker and continues from its last checkpoint; when capacity returns, the autoscaler's replacement node joins and
  the run grows back to two workers. Every resume restores its checkpoint's exact state.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from raymed import storage
from raymed.train.elastic import DUMP_ENV

from tests.cluster_fixtures import (FAKE_HEAD_ID, PYTHON, REPO, RayCluster, S3Server, cluster_env,
                                    fake_autoscaling_config, job_logs, run_cli, run_job_command, wait_until)
from tests.fixtures.elastic import check_restore

pytestmark = pytest.mark.integration

SHIPPED = REPO / "cluster" / "aws.yaml"
NODE_CPUS, MAX_NODES, IDLE_MINUTES = 4, 2, 0.2


@pytest.fixture(scope="module")
def spot(tmp_path_factory) -> Path:
    """The spot market's folder (tests.fixtures.spot_cloud): capacity available."""
    folder = tmp_path_factory.mktemp("spot")
    (folder / "capacity").touch()
    return folder


@pytest.fixture(scope="module")
def restored(tmp_path_factory) -> Path:
    """Where elastic workers write the state they hold after each resume (raymed.train.elastic.DUMP_ENV)."""
    return tmp_path_factory.mktemp("restored")


@pytest.fixture(scope="module")
def cluster(s3, spot, restored) -> RayCluster:
    ray_cluster = RayCluster(root=Path("/tmp"), env={**cluster_env(s3), DUMP_ENV: str(restored)})
    config = fake_autoscaling_config(SHIPPED, NODE_CPUS, MAX_NODES, IDLE_MINUTES, spot)
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
            "train.epochs=1", "scaling.cpus_per_worker=2"]  # 2.5 CPUs a trial: one trial a node
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

    # Idle nodes go after `idle_timeout_minutes`, but the autoscaler keeps those a standing resource request needs:
    # a trial Tune ends at its last epoch is killed with its Ray Train controller, which then never withdraws its
    # request from Ray Data's autoscaling coordinator; it expires 180 s after its last refresh (docs/cluster.md).
    try:
        wait_until(lambda: not any(n["Alive"] for n in launched(cluster)), 300, "the idle nodes to be removed",
                   interval=2.0)
    except TimeoutError as err:
        status = subprocess.run([str(Path(PYTHON).parent / "ray"), "status", "-v", "--address", cluster.address],
                                env={**os.environ, **cluster.env}, capture_output=True, text=True, timeout=120)
        actors = subprocess.run([str(Path(PYTHON).parent / "ray"), "list", "actors", "--filter", "state=ALIVE",
                                 "--address", cluster.dashboard], env={**os.environ, **cluster.env},
                                capture_output=True, text=True, timeout=120)
        raise AssertionError(f"{err}\n{launched(cluster)}\n{status.stdout[-6000:]}\n{actors.stdout[-4000:]}") from None


def checkpoints(s3: S3Server, prefix: str) -> dict[int, dict]:
    """epoch -> state.json of every checkpoint a run has on S3."""
    return {int(key.split("/epoch-")[1][:4]): s3_json(s3, key) for key in s3.keys(prefix)
            if key.endswith("/state.json") and "/epoch-" in key}


def registered(s3: S3Server, prefix: str) -> int | None:
    """The epoch of the last checkpoint Ray Train has registered for a run (its checkpoint manager's snapshot): the
    one a restart resumes from. A checkpoint's files are complete on storage a moment before the controller polls
    the report that registers it; a node lost in between costs that epoch."""
    key = prefix + "checkpoint_manager_snapshot.json"
    if key not in s3.keys(key):
        return None
    latest = s3_json(s3, key).get("latest_checkpoint_result")
    return int(latest["checkpoint_dir_name"].removeprefix("epoch-")) if latest else None


def state(s3: S3Server, prefix: str, epoch: int) -> dict:
    """One checkpoint's state.json."""
    return s3_json(s3, f"{prefix}epoch-{epoch:04d}/state.json")


EPOCHS = 24


def test_a_reclaimed_spot_node_shrinks_an_elastic_run_and_its_replacement_grows_it_back(s3, cluster, dataset, spot,
                                                                                         restored, tmp_path, monkeypatch):
    """An elastic run (`scaling.num_workers: [1, 2]`, one worker a node) loses a node to the spot market while it
    trains: it continues on one worker from its last checkpoint; when capacity returns the autoscaler's replacement
    node joins and the run grows back to two workers, each resume restoring the checkpoint's exact state."""
    name, t0 = "spot", time.time()
    args = ["--config", "configs/train/tiny-llava-ln.yaml", f"data.path={dataset}", f"run.storage={s3.uri('elastic')}",
            f"run.name={name}", "scaling.num_workers=[1,2]", "scaling.cpus_per_worker=2.5",  # one a node, as a GPU
            "scaling.resize_interval_s=5", "run.max_failures=1",
            f"train.epochs={EPOCHS}", f"train.eval_every={EPOCHS}", "data.max_eval_rows=4", "train.zero_shot=false",
            f"run.keep_checkpoints={EPOCHS}", "run.report_to=[]"]
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([PYTHON, "-m", "raymed.train", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **cluster_env(s3), "RAY_ADDRESS": cluster.address,
                                       "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"})
    prefix = f"elastic/{name}/"

    def by(world: int, after: int = 0) -> int | None:
        """The last registered checkpoint, when `world` workers wrote it after epoch `after`."""
        epoch = registered(s3, prefix)
        return epoch if epoch and epoch > after and state(s3, prefix, epoch)["world_size"] == world else None

    def stamp(what: str) -> None:
        print(f"[{time.time() - t0:5.0f}s] {what}")

    try:
        before = wait_until(lambda: by(2), 600, "a checkpoint written by 2 workers", interval=1.0)
        victim = state(s3, prefix, before)["history"][-1]["worker_nodes"][-1]
        (spot / "capacity").unlink()  # no spot capacity for a while: the replacement waits
        (spot / "reclaim").write_text(victim + "\n")
        stamp(f"epoch {before} on 2 workers: node {victim[-5:]} reclaimed")
        wait_until(lambda: by(1, before), 600, "a checkpoint written by 1 worker", interval=1.0)
        shrunk = min(e for e, s in checkpoints(s3, prefix).items() if e > before and s["world_size"] == 1)
        stamp(f"epoch {shrunk} on 1 worker: capacity back")
        (spot / "capacity").touch()
        assert driver.wait(900) == 0
        stamp("run done")
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log.read_text()
    states = checkpoints(s3, prefix)
    worlds = [states[e]["world_size"] for e in sorted(states)]
    stamp(f"world sizes by epoch: {worlds}")
    assert sorted(states) == list(range(1, EPOCHS + 1)), output[-5000:]
    grown = next((e for e in sorted(states) if e > shrunk and states[e]["world_size"] == 2), None)
    assert grown, f"the run never grew back to 2 workers: {worlds}"

    # Ray's own record: the reclaimed node is gone, the autoscaler launched a replacement, which trained
    reclaimed = (spot / "reclaimed").read_text().split()
    nodes = {n["NodeID"]: n for n in launched(cluster)}
    assert reclaimed[0] == victim and not nodes[victim]["Alive"]
    history = states[EPOCHS]["history"]
    assert len(history) == EPOCHS
    trained_on = [set(h["worker_nodes"]) for h in history]
    assert victim in trained_on[shrunk - 2] and not any(victim in on for on in trained_on[shrunk - 1:])
    new = trained_on[grown - 1] - set().union(*trained_on[:shrunk - 1])
    assert len(new) == 1 and nodes[new.pop()]["Alive"], (trained_on, nodes)  # the replacement

    # Each resume restored the checkpoint it resumed from exactly (weights, Adam moments, counters, lr), re-sharded
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / name
    storage.download_dir(s3.uri(prefix.rstrip("/")), run_dir)
    resumes = sorted((restored / name).glob("restored-epoch*-w*.safetensors"))
    seen = {(int(p.stem.split("epoch")[1].split("-")[0]), int(p.stem.split("-w")[1])) for p in resumes}
    assert {(shrunk - 1, 1), (grown - 1, 2)} <= seen, seen  # shrunk, then grown, from the last checkpoint
    for epoch, world in sorted(seen):
        got = check_restore(run_dir, restored / name, epoch=epoch, world=world)
        assert got["lr"] == pytest.approx(history[epoch - 1]["lr"], rel=1e-9)
    # steps per epoch follow the world size; the lr schedule ends at zero on the last step
    steps = [h["step"] - (history[i - 1]["step"] if i else 0) for i, h in enumerate(history)]
    per_world = {w: {s for s, ww in zip(steps, worlds) if ww == w} for w in (1, 2)}
    assert len(per_world[1]) == len(per_world[2]) == 1 and min(per_world[1]) > min(per_world[2]), (steps, worlds)
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert "world size changed" in output
