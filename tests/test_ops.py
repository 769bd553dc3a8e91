"""Operations: a sweep killed with the local Ray cluster it started resumes with `--resume`.

(`ray job submit --working-dir .` of a sweep, its driver lost and resumed, runs in tests/test_cluster_s3.py.)
The test starts its driver in a separate process group and kills only that group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.cluster_fixtures import wait_until
from tests.test_tune import SWEEP, check_report

pytestmark = pytest.mark.integration
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "TRANSFORMERS_VERBOSITY": "error"}


def test_killed_sweep_resumes(tmp_path):
    """SIGKILL of the driver and its local cluster after the trial's first epoch checkpoint: the same command with
    `--resume` continues that trial from its checkpoint (epochs recorded once each, in order) and writes the
    report."""
    cmd = [sys.executable, "-m", "raymed.tune", "--config", str(SWEEP), "--out", str(tmp_path), "train.epochs=3",
           "sweep.search.method.name=[lora]"]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    runs = tmp_path / "tiny-cpu" / "runs"
    try:
        wait_until(lambda: any(runs.glob("*/epoch-0001/model/trainable.safetensors")), 600, "a first checkpoint",
                   interval=0.25)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        driver.wait(timeout=60)
    assert not (tmp_path / "tiny-cpu" / "report.md").exists()
    assert not any(runs.glob("*/epoch-0003")), "the trial finished before its driver was killed"
    resumed = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = check_report(tmp_path / "tiny-cpu")
    assert [(t["method"], t["epochs"], t["status"]) for t in summary["trials"]] == [("lora", 3, "completed")]
    for result in runs.glob("*/epoch-*/row.json"):
        history = json.loads(result.read_text())["history"]
        assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
