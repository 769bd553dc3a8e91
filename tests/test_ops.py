"""Operations: `ray job submit` against our own `ray start --head`, and resuming a killed sweep.

Each test here starts its own Ray cluster in a separate process group and stops only that one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster_fixtures import run_job_command
from tests.test_tune import ROOT, SWEEP, check_report

pytestmark = pytest.mark.integration
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "TRANSFORMERS_VERBOSITY": "error"}
# Ray 2.60 enables token authentication on clusters it starts; its clients send the token
# (~/.ray/auth_token) only in token mode.
CLIENT_ENV = {**ENV, "RAY_AUTH_MODE": "token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    """A `ray start --head` cluster of our own (blocking process in its own session, stopped by us only)."""
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = ENV
    log = open(tmp_path / "ray-head.log", "wb")  # noqa: SIM115 - closed when the node stops
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 300  # a loaded 2-core machine can take minutes to bring up GCS + dashboard
    while time.time() < deadline:
        ok = subprocess.run([ray_bin, "job", "list", "--address", address], env=CLIENT_ENV, capture_output=True)
        if ok.returncode == 0:
            break
        time.sleep(2)
    else:
        _stop(proc)
        log.close()
        tail = (tmp_path / "ray-head.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"ray head node did not come up; last `ray job list` said: {ok.stderr.decode()[-1000:]}\n"
                    f"head log: {tail}")
    yield address, CLIENT_ENV, ray_bin
    _stop(proc)
    log.close()


def _stop(proc: subprocess.Popen) -> None:
    """Stop our head node: `ray start --block` shuts its cluster down on SIGINT (not on SIGTERM)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_ray_job_submit(head_node, tmp_path):
    address, env, ray_bin = head_node
    out = tmp_path / "exp"
    job = run_job_command(
        [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         sys.executable, "-m", "raymed.tune", "--config", "configs/sweeps/tiny-cpu.yaml", "--out", str(out),
         "train.epochs=1"],
        env=env, timeout=900,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    check_report(out / "tiny-cpu")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(2)
    pytest.fail(f"timed out waiting for {what}")


def test_killed_sweep_resumes(tmp_path):
    cmd = [sys.executable, "-m", "raymed.tune", "--config", str(SWEEP), "--out", str(tmp_path), "train.epochs=3"]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    runs = tmp_path / "tiny-cpu" / "runs"
    try:
        _wait_for(lambda: any(runs.glob("*/epoch-0001/model/trainable.safetensors")), 600, "a first checkpoint")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        driver.wait(timeout=60)
    assert not (tmp_path / "tiny-cpu" / "report.md").exists()
    resumed = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = check_report(tmp_path / "tiny-cpu")
    assert sorted(t["method"] for t in summary["trials"]) == ["ln", "lora"]
    for result in runs.glob("*/epoch-*/row.json"):
        history = json.loads(result.read_text())["history"]
        assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
