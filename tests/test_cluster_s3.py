"""The cluster path on one machine: object storage (a local S3 server) and a multi-node Ray cluster.

Everything goes through the user's commands (`python -m raymed.data prepare`, `python -m raymed.train`,
`ray job submit -- python -m raymed.tune`, `python -m raymed.report`) against `s3://` URIs; only the
endpoint (`AWS_ENDPOINT_URL`) differs from a cloud run. Nodes are separate raylets (`ray start`), and a
lost node is SIGKILLed (raylet, object store and workers gone), not stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from safetensors.torch import load as load_safetensors

from tests.cluster_fixtures import RayCluster, S3Server, cluster_env, run_cli, start_s3

pytestmark = pytest.mark.integration

TRAIN = ["model.name=tiny-llava", "method.name=ln", "train.batch_size=4", "train.lr=5e-3", "train.zero_shot=false",
         "data.max_eval_rows=4", "data.preprocess_actors=0", "scaling.cpus_per_worker=0.5",
         "run.metrics_export=false"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3) -> RayCluster:
    """Head (drivers, data tasks) + worker node `b`: a 2-worker run with STRICT_SPREAD uses both."""
    ray_cluster = RayCluster(root=Path("/tmp"), env=cluster_env(s3))
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
    assert f"data/synth/manifest.json" in s3.keys("data/")
    return uri


def client_env(s3: S3Server, cluster: RayCluster) -> dict[str, str]:
    return {**cluster_env(s3), "RAY_ADDRESS": cluster.address}


def test_zero3_workers_on_two_nodes_with_s3_storage(s3, cluster, dataset):
    storage = s3.uri("runs")
    done = run_cli("raymed.train", [*TRAIN, f"data.path={dataset}", f"run.storage={storage}", "run.name=z3",
                                    "train.epochs=2", "deepspeed.zero_stage=3", "scaling.num_workers=2",
                                    "scaling.placement_strategy=STRICT_SPREAD"], client_env(s3, cluster))
    keys = s3.keys("runs/z3/")
    result = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="runs/z3/result.json")["Body"].read())
    assert result["steps"] == 8 and result["history"][-1]["zero_stage"] == 3
    nodes = {n.node_id for n in cluster.nodes}
    assert sorted(result["worker_nodes"]) == sorted(nodes), (result["worker_nodes"], nodes)  # one per node
    assert result["checkpoint"].startswith(f"{storage}/z3/epoch-")
    ckpt = result["checkpoint"].removeprefix(f"s3://{s3.bucket}/")
    assert f"{ckpt}/model/trainable.safetensors" in keys and f"{ckpt}/resume/latest" in keys
    assert "eval/test/overall_acc" in result["metrics"], done.stdout
    assert not Path(cluster.root, "s3:").exists() and not (Path.cwd() / "s3:").exists()  # nothing local
