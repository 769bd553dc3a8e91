"""Sweeps: a real Ray Tune run of real Ray Train trials, its report, and `ray job submit` against a head node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymed.tune import main as tune_main
from tests.test_report import _md_tables, _num

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "sweeps" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
    yield
    ray.shutdown()


def _check_report(exp: Path) -> dict:
    for name in ("results.json", "results.csv", "report.md", "frontier.png"):
        assert (exp / name).is_file(), name
    summary = json.loads((exp / "results.json").read_text())
    tables = _md_tables((exp / "report.md").read_text())
    trials = {t["trial_id"]: t for t in summary["trials"]}
    for row in tables["All trials"]:
        for name in summary["metric_columns"]:
            assert _num(row[name]) == trials[row["trial_id"]]["metrics"].get(name)
    return summary


def test_sweep_with_asha_writes_the_report(ray_cluster, tmp_path, capsys):
    # Four trials, three epochs, ASHA on the training loss (distinct values: decisions are never ties).
    rc = tune_main(["--config", str(SWEEP), "--out", str(tmp_path), "train.epochs=3",
                    "sweep.search={method.name: [ln, lora, attn, full], train.lr: [0.01]}",
                    "sweep.metric=loss", "sweep.mode=min", "sweep.max_concurrent=2"])
    assert rc == 0
    summary = _check_report(tmp_path / "tiny-cpu")
    rows = summary["trials"]
    assert sorted(t["method"] for t in rows) == ["attn", "full", "ln", "lora"]
    assert all(t["params"]["trainable"] > 0 for t in rows)
    assert any(t["stopped_early"] for t in rows), "ASHA stopped no trial"
    assert all(t["steps"] > 0 for t in rows)
    assert "report.md" in capsys.readouterr().out or (tmp_path / "tiny-cpu" / "report.md").exists()


def test_resource_request_the_cluster_can_never_satisfy(ray_cluster, tmp_path, capsys):
    assert tune_main(["--config", str(SWEEP), "--out", str(tmp_path), "scaling.num_workers=16"]) == 2
    assert "the cluster has 4" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """A `ray start --head` cluster of our own (blocking process in its own session, stopped by us only)."""
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True)
        if ok.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("ray head node did not come up")
    yield address, env, ray_bin
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_ray_job_submit(head_node, tmp_path):
    address, env, ray_bin = head_node
    out = tmp_path / "exp"
    job = subprocess.run(
        [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         "python", "-m", "raymed.tune", "--config", "configs/sweeps/tiny-cpu.yaml", "--out", str(out),
         "train.epochs=1"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    _check_report(out / "tiny-cpu")
