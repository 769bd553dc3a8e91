"""The cluster path on one machine: object storage (a local S3 server) and a multi-node Ray cluster.

Everything goes through the user's commands (`python -m raymed.data prepare`, `python -m raymed.train`,
`ray job submit -- python -m raymed.tune`, `python -m raymed.tune.report`) against `s3://` URIs; only the
endpoint (`AWS_ENDPOINT_URL`) differs from a cloud run. Nodes are separate raylets (`ray start`), and a
lost node is SIGKILLed (raylet, object store and workers gone), not stopped.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import subprocess

import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.cluster_fixtures import (PYTHON, REPO, RayCluster, S3Server, cluster_env, job_logs, run_cli,
                                    run_job_command)

pytestmark = pytest.mark.integration

# The model is a transformers folder on S3 (`model` fixture): every node fetches it into its own cache.
MODEL = "s3://raymed-test/models/tiny-llava"
TRAIN = [f"model.name={MODEL}", "model.family=llava", "method.name=ln", "train.batch_size=4", "train.lr=5e-3", "train.zero_shot=false",
         "data.max_eval_rows=4", "data.preprocess_actors=0", "scaling.cpus_per_worker=0.5",
         "run.metrics_export=false"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> Path:
    """Each node's Hugging Face cache (`caches/head`, `caches/b`) and the driver's (`caches/driver`)."""
    return tmp_path_factory.mktemp("hf-caches")


@pytest.fixture(scope="module")
def cluster(s3, caches) -> RayCluster:
    """Head (drivers, data tasks) + worker node `b`: a 2-worker run with STRICT_SPREAD uses both."""
    ray_cluster = RayCluster(root=Path("/tmp"), env=cluster_env(s3), caches=caches)
    try:
        ray_cluster.start_head(cpus=3)
        ray_cluster.add_node("b", cpus=1)
        yield ray_cluster
    finally:
        ray_cluster.shutdown()


@pytest.fixture(scope="module")
def dataset(s3, cluster, tmp_path_factory) -> str:
    """Synthetic Med-VQA, prepared straight to S3 with the CLI (40 images -> 32 train rows)."""
    raw = tmp_path_factory.mktemp("raw")
    env = cluster_env(s3)
    run_cli("raymed.data", ["synth", "--out", str(raw), "--n", "40", "--seed", "0"], env)
    uri = s3.uri("data", "synth")
    run_cli("raymed.data", ["prepare", "--format", "vqa-rad", "--input", str(raw), "--out", uri], env)
    assert "data/synth/manifest.json" in s3.keys("data/")
    return uri


@pytest.fixture(scope="module")
def model(s3, tmp_path_factory) -> str:
    """tiny-llava saved as a transformers folder and uploaded to `MODEL`."""
    from raymed.models import load_model, load_processor

    local = tmp_path_factory.mktemp("tiny-llava")
    load_model("tiny-llava").save_pretrained(local, safe_serialization=True)
    load_processor("tiny-llava").save_pretrained(local)
    assert s3.uri("models", "tiny-llava") == MODEL
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.client().upload_file(str(f), s3.bucket, f"models/tiny-llava/{f.relative_to(local).as_posix()}")
    return MODEL


def client_env(s3: S3Server, cluster: RayCluster) -> dict[str, str]:
    return {**cluster_env(s3), "RAY_ADDRESS": cluster.address, "HF_HOME": str(cluster.caches / "driver")}


def s3_json(s3: S3Server, key: str) -> dict:
    return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())


def trainable(s3: S3Server, checkpoint_uri: str) -> dict:
    key = checkpoint_uri.removeprefix(f"s3://{s3.bucket}/") + "/model/trainable.safetensors"
    return load_safetensors(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())


# One run config for the two-node run and the node-loss run (placement and max_failures do not change the
# result): ZeRO-3 over two workers, 2 epochs, everything on S3.
RUN = ["train.epochs=2", "deepspeed.zero_stage=3", "scaling.num_workers=2"]


@pytest.fixture(scope="module")
def reference(s3, cluster, dataset, model) -> dict:
    """The uninterrupted run: one worker on each node (STRICT_SPREAD)."""
    run_cli("raymed.train", [*TRAIN, *RUN, f"data.path={dataset}", f"run.storage={s3.uri('runs')}", "run.name=z3",
                             "scaling.placement_strategy=STRICT_SPREAD"], client_env(s3, cluster))
    return s3_json(s3, "runs/z3/raymed-result.json")


def _steps(s3: S3Server, epochs: int, workers: int, batch: int) -> int:
    rows = s3_json(s3, "data/synth/manifest.json")["splits"]["train"]["rows"]
    return epochs * -(-(rows // workers) // batch)


def test_zero3_workers_on_two_nodes_with_s3_storage(s3, cluster, reference):
    result = reference
    assert result["steps"] == _steps(s3, 2, 2, 4) and result["history"][-1]["zero_stage"] == 3
    nodes = {n.node_id for n in cluster.nodes}
    assert len(nodes) == 2 and sorted(result["worker_nodes"]) == sorted(nodes)  # one worker per node
    storage = s3.uri("runs")
    assert result["checkpoint"].startswith(f"{storage}/z3/epoch-0002")
    keys = s3.keys("runs/z3/")
    ckpt = result["checkpoint"].removeprefix(f"s3://{s3.bucket}/")
    assert f"{ckpt}/model/trainable.safetensors" in keys and f"{ckpt}/resume/latest" in keys
    assert "eval/test/overall_acc" in result["metrics"]
    assert not (REPO / "s3:").exists()  # nothing written to a local path named after the URI
    # The model came from S3, fetched once into each node's own cache (no shared folder): one complete copy each.
    for node in ("head", "b"):
        fetched = cluster.caches / node / "raymed-models" / "fetched"
        copies = [p for p in fetched.iterdir() if p.is_dir()]
        assert len(copies) == 1 and (copies[0] / "config.json").is_file(), (node, list(fetched.iterdir()))
        assert not [p for p in fetched.iterdir() if p.name.startswith(".")]  # no half-fetched folder left


def test_summarize_reads_only_the_result_row(s3, cluster, reference, monkeypatch):
    from raymed import storage
    from raymed.train.launch import summarize
    from ray.train import Result

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    fs, path = storage.filesystem(s3.uri("runs", "z3"))
    result = Result.from_path(path, storage_filesystem=fs)
    sizes = s3.keys("runs/z3/")
    mark = s3.log_mark()
    summary = summarize(result)
    time.sleep(0.5)  # the server's log is line-buffered by a subprocess
    after = s3.gets_since(mark)
    mark = s3.log_mark()
    with result.checkpoint.as_directory():
        pass
    time.sleep(0.5)
    before = s3.gets_since(mark)
    read_after, read_before = sum(sizes[k] for k in after), sum(sizes[k] for k in set(before))
    print(f"summarize read {read_after} B from S3 ({len(after)} objects); as_directory() read {read_before} B "
          f"({len(set(before))} objects)")
    assert sorted(k.rsplit("/", 1)[-1] for k in after) == ["row.json"]  # one object: the row, nothing else
    # the row (config, machine, per-epoch metrics and per-question correctness) is a fraction of the checkpoint
    assert summary["steps"] == reference["steps"] and read_after * 3 < read_before


def test_node_loss_resumes_from_s3_and_matches_the_uninterrupted_run(s3, cluster, reference):
    """A worker node is SIGKILLed in epoch 2; the run restarts its workers on the surviving node from the
    epoch-1 checkpoint on S3 and ends with the reference run's steps and trainable weights."""
    victim = next(n for n in cluster.nodes if n.name == "b")
    args = [*TRAIN, *RUN, f"data.path={dataset_uri(s3)}", f"run.storage={s3.uri('runs')}", "run.name=nodeloss",
            "scaling.placement_strategy=SPREAD", "run.max_failures=2"]
    t0 = time.time()
    proc = subprocess.Popen([PYTHON, "-m", "raymed.train", *args], env={**os.environ, **client_env(s3, cluster)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    killed_at = None
    for line in proc.stdout:
        lines.append(line)
        if killed_at is None and "epoch 2: first step done" in line:
            # Ray Train's controller records a report (and its checkpoint) when it next polls the workers (every
            # 2 s); kill once it has, so the restart resumes from epoch 1 rather than from scratch.
            _recorded(s3, "runs/nodeloss", "epoch-0001", timeout=20)
            killed = cluster.kill_node(victim)
            killed_at = time.time() - t0
    proc.wait(timeout=600)
    wall = time.time() - t0
    out = "".join(lines)
    assert proc.returncode == 0, out[-6000:]
    assert killed_at is not None and killed > 0, out[-3000:]
    result = s3_json(s3, "runs/nodeloss/raymed-result.json")
    print(f"node-loss run: node killed at {killed_at:.0f}s ({killed} processes), finished at {wall:.0f}s; "
          f"run wall {result['wall_s']:.0f}s vs uninterrupted {reference['wall_s']:.0f}s: "
          f"lost {result['wall_s'] - reference['wall_s']:.0f}s")
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2] and result["steps"] == reference["steps"]
    assert victim.node_id in history[0]["worker_nodes"]  # epoch 1 ran on the lost node (from the checkpoint)
    assert victim.node_id not in history[1]["worker_nodes"]  # resumed without it
    got, want = trainable(s3, result["checkpoint"]), trainable(s3, reference["checkpoint"])
    assert set(got) == set(want)
    for name in want:  # same data order, same seeds, restored optimizer and RNG: equal up to float reordering
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    cluster.add_node("b", cpus=1)  # a replacement node for the tests that follow


def _recorded(s3: S3Server, run_prefix: str, checkpoint: str, timeout: float) -> None:
    """Wait until Ray Train's checkpoint manager snapshot of a run (on S3) lists `checkpoint`."""
    end, key = time.time() + timeout, f"{run_prefix}/checkpoint_manager_snapshot.json"
    while time.time() < end:
        if key in s3.keys(run_prefix) and checkpoint in json.dumps(s3_json(s3, key)):
            return
        time.sleep(0.25)


def dataset_uri(s3: S3Server) -> str:
    return s3.uri("data", "synth")


SWEEP_ARGS = ["--config", "configs/sweeps/tiny-cpu.yaml", "train.epochs=1", "sweep.max_concurrent=1",
              "sweep.search={method.name: [ln, lora], train.lr: [0.01]}"]


def _submit(s3: S3Server, cluster: RayCluster, *args: str, wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python -m raymed.tune ...`, from the repository root (README)."""
    return _ray(s3, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
                *([] if wait else ["--no-wait"]), "--", "python", "-m", "raymed.tune", *args)


def _ray(s3: S3Server, *args: str) -> subprocess.CompletedProcess:
    return run_job_command([str(Path(PYTHON).parent / "ray"), *args], env={**os.environ, **cluster_env(s3)},
                           timeout=900, cwd=REPO)


def _finished_trials(s3: S3Server, prefix: str) -> dict[str, dict[str, Any]]:
    """Trials the sweep's saved experiment state (on S3) records as TERMINATED: trial id -> LastModified of
    every object of its training run (`runs/trial-<id>/`)."""
    client, done = s3.client(), set()
    for key in [k for k in s3.keys(prefix) if k.rsplit("/", 1)[-1].startswith("experiment_state")]:
        trials = [json.loads(t) for t, _ in json.loads(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
                  ["trial_data"]]
        done |= {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}
    return {t: {k: client.head_object(Bucket=s3.bucket, Key=k)["LastModified"]
                for k in s3.keys(f"{prefix}runs/trial-{t}/")} for t in sorted(done)}


def test_job_submitted_sweep_survives_driver_loss(s3, cluster, dataset):
    """`ray job submit` of a sweep with everything on S3; its driver is SIGKILLed after the first trial
    finished; a second submission with `--resume` finishes the sweep without re-running that trial, and
    the report is read back from S3."""
    import psutil

    out = s3.uri("exp")
    args = [*SWEEP_ARGS, "--out", out, f"data.path={dataset}"]
    submitted = _submit(s3, cluster, *args, wait=False)
    assert submitted.returncode == 0, submitted.stderr

    def driver() -> list:
        return [p for p in psutil.process_iter(["cmdline"])
                if "raymed.tune" in " ".join(p.info["cmdline"] or []) and out in " ".join(p.info["cmdline"] or [])]

    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    deadline, polls = time.time() + 400, 0
    while not (stamps := _finished_trials(s3, "exp/tiny-cpu/")):
        polls += 1
        status = _ray(s3, "job", "status", "--address", cluster.dashboard, job_id) if polls % 5 == 0 else None
        status = status.stdout + status.stderr if status else ""
        if time.time() > deadline or "FAILED" in status or "SUCCEEDED" in status:
            raise AssertionError(f"no trial finished:\n{job_logs(cluster, cluster_env(s3))}")
        time.sleep(1)
    victims = driver()
    assert victims, "job driver not found"
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=10)

    assert len(stamps) < 2, "the sweep finished before its driver was killed"
    resumed = _submit(s3, cluster, *args, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-6000:] + resumed.stderr[-4000:]
    after = _finished_trials(s3, "exp/tiny-cpu/")
    assert len(after) == 2
    for trial_id, objects in stamps.items():  # the finished trials were not trained again: no object changed
        assert after[trial_id] == objects, trial_id

    summary = s3_json(s3, "exp/tiny-cpu/results.json")  # the report, read back from S3
    assert sorted(t["method"] for t in summary["trials"]) == ["ln", "lora"]
    assert {"exp/tiny-cpu/report.md", "exp/tiny-cpu/results.csv", "exp/tiny-cpu/frontier.png"} <= set(s3.keys("exp/"))
    # `python -m raymed.tune.report` rebuilds it from the trials' result rows (row.json in their checkpoints) on S3
    done = run_cli("raymed.tune.report", [s3.uri("exp", "tiny-cpu"), "--out", s3.uri("exp", "rebuilt")], cluster_env(s3))
    assert "2 trials ranked" in done.stdout
    assert s3_json(s3, "exp/rebuilt/results.json")["best_per_method"].keys() == summary["best_per_method"].keys()
