"""Elastic runs (`scaling.num_workers: [min, max]`): real Ray Train elastic worker groups, DeepSpeed ZeRO on gloo.

One ZeRO-3 run goes 2 -> 1 -> 2 workers: it crashes (no restarts left), is re-run where only one worker fits, crashes again
and is re-run where two fit. After each resume the worker writes what its engine holds (RAYMED_RESTORE_DUMP): the
fp32 master weights and Adam moments gathered back through DeepSpeed, and the module's own weights. Each must equal
the checkpoint it resumed from, re-sharded to the new world size (and ZeRO stage).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from raymed.cluster import start_local_ray
from raymed.config import load_config
from raymed.train.elastic import DUMP_ENV
from raymed.train.launch import fit
from tests.fixtures.elastic import check_restore

pytestmark = pytest.mark.integration

# 42 training rows (14 images; 2 more are carved into val), 16 per micro-batch: 2 steps per epoch on 2 workers, 3 on 1.
BASE = [
    "model.name=tiny-llava", "data.synth_n=20", "data.max_eval_rows=4", "data.synth_ood_style=null",
    "data.preprocess_actors=0", "train.epochs=3", "train.batch_size=16", "train.lr=5e-3", "train.zero_shot=false",
    "train.eval_every=3", "scaling.num_workers=[1,2]", "scaling.resize_interval_s=5", "run.metrics_export=false",
    "run.keep_checkpoints=5", "run.report_to=[]",
]
# The test cluster has 4 CPUs: at 1 CPU per worker two workers fit, at 2.5 only one (scaling.cpus_per_worker may
# change on resume: it does not change what a run computes).
TWO, ONE = "scaling.cpus_per_worker=1", "scaling.cpus_per_worker=2.5"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    dump = tmp_path_factory.mktemp("restored")
    start_local_ray(num_cpus=4, log_to_driver=False,
                    runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", DUMP_ENV: str(dump),
                                              "RAYMED_FAULT_DELAY_S": "5"}})
    yield tmp_path_factory.mktemp("runs"), dump
    ray.shutdown()


def _run(storage: Path, name: str, *overrides: str) -> dict:
    return fit(load_config(None, [*BASE, f"run.storage={storage}", f"run.name={name}", *overrides]))


# ZeRO-2 -> ZeRO-0 -> ZeRO-2 (a lone fp32 worker runs stage 0) is tests/test_autoscaling.py's spot-loss run: the same
# restore checks, the group shrunk by a reclaimed node and grown by the autoscaler's replacement.
@pytest.mark.parametrize(("stage", "one_worker_stage"), [(3, 3)], ids=["zero3"])
def test_two_one_two_workers_restore_the_saved_state(cluster, stage, one_worker_stage):
    storage, dump = cluster
    name = f"elastic-z{stage}"
    common = (f"deepspeed.zero_stage={stage}", f"deepspeed.shard_single_worker={one_worker_stage != 0}")
    run_dir = storage / name

    # 2 workers: epoch 1 (steps 1-2) checkpointed, the last worker dies at step 4 (end of epoch 2), no restarts.
    with pytest.raises(Exception):
        _run(storage, name, *common, TWO, "run.fail_at_step=4")
    (run_dir / "fault-injected.txt").unlink()
    # Only one worker fits: resumes epoch 1's checkpoint on 1 worker (3 steps per epoch), checkpoints epoch 2 at step
    # 5, dies at step 8 (end of epoch 3).
    with pytest.raises(Exception):
        _run(storage, name, *common, ONE, "run.fail_at_step=8")
    first = check_restore(run_dir, dump / name, epoch=1, world=1)
    assert first["state"]["world_size"] == 2 and first["state"]["zero_stage"] == stage
    assert first["zero_stage"] == one_worker_stage
    # Two fit again: resumes epoch 2's checkpoint (1 worker) on 2 workers and finishes epoch 3 (steps 6-7).
    done = _run(storage, name, *common, TWO, "run.fail_at_step=8")
    second = check_restore(run_dir, dump / name, epoch=2, world=2)
    assert second["state"]["world_size"] == 1 and second["state"]["zero_stage"] == one_worker_stage
    assert second["zero_stage"] == stage

    assert [h["step"] for h in done["history"]] == [2, 5, 7]
    assert [len(h["worker_nodes"]) for h in done["history"]] == [2, 1, 2]
    # The lr schedule continues where it was (no jump at a resume) and still ends at zero on the last step.
    peak = 5e-3
    first_lr = peak * 0.5 * (1 + math.cos(math.pi * (2 - 1) / (6 - 1)))  # 6 steps at 2 workers, warm-up 1
    assert done["history"][0]["lr"] == pytest.approx(first_lr, rel=1e-9)
    assert first["lr"] == pytest.approx(first_lr, rel=1e-9)  # resumed at step 2 with the lr step 2 had
    assert second["lr"] == pytest.approx(done["history"][1]["lr"], rel=1e-9)
    assert done["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert done["steps"] == 7
