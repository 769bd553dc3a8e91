"""Sweeps: a real Ray Tune run of real Ray Train trials (in-process Ray cluster) and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raymed.tune import questions
from raymed.cluster import start_local_ray
from raymed.tune.sweep import main as tune_main
from tests.test_report import cell_number, md_tables

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "sweeps" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    start_local_ray(num_cpus=4, log_to_driver=False,
                    runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
    yield
    ray.shutdown()


def check_report(exp: Path) -> dict:
    for name in ("results.json", "results.csv", "report.md", "frontier.png", "curves.png"):
        assert (exp / name).is_file(), name
    summary = json.loads((exp / "results.json").read_text())
    tables = md_tables((exp / "report.md").read_text())
    trials = {t["trial_id"]: t for t in summary["trials"]}
    for row in tables["All trials"]:
        for name in summary["metric_columns"]:
            assert cell_number(row[name]) == trials[row["trial_id"]]["metrics"].get(name)
    return summary


def test_asha_per_method_sweep_writes_the_report(ray_cluster, tmp_path, capsys):
    # Ray Tune with `scheduler.per: method.name`, ASHA on the training loss (distinct, seeded values): trials run one
    # at a time in grid order (full 1e-2, ln 1e-2, full 1e-4, ln 1e-4). ln at 1e-2 is compared with ln only, so it
    # goes on even though its loss is above full's at the first rung (one ASHA over all trials stops it there:
    # checked by running this without `per`); each method's 1e-4 trial stops.
    rc = tune_main(["--config", str(SWEEP), "--out", str(tmp_path), "train.epochs=2",
                    "sweep.search={method.name: [full, ln], train.lr: [0.01, 0.0001]}",
                    "sweep.scheduler={type: asha, grace_period: 1, reduction_factor: 2, per: method.name}",
                    "sweep.metric=loss", "sweep.mode=min", "sweep.max_concurrent=1"])
    assert rc == 0
    summary = check_report(tmp_path / "tiny-cpu")
    rows = summary["trials"]
    stopped = {(t["method"], t["lr"]): t["stopped_early"] for t in rows}
    assert stopped == {("full", 0.01): False, ("ln", 0.01): False, ("full", 0.0001): True, ("ln", 0.0001): True}
    loss = {(t["method"], t["lr"]): t["metrics"]["loss"] for t in rows}
    assert loss[("ln", 0.01)] > loss[("full", 0.01)]
    assert all(t["params"]["trainable"] > 0 and t["steps"] > 0 for t in rows)
    # every trial evaluated the carved val split (2 of the 16 train images: 6 questions) and test (8 of 12 asked),
    # and carries which of those questions it got right, for the report's paired tests
    for t in rows:
        assert {k: len(v["correct"]) for k, v in t["answers"].items()} == {"eval/val": 6, "eval/test": 8}
        assert t["status"] == ("stopped" if t["stopped_early"] else "completed")
        assert t["metrics"]["eval/val/n_closed"] + t["metrics"]["eval/val/n_open"] == 6
    assert set(summary["comparisons"]["full"]) == {"zero-shot", "ln", "ln_trial"}
    assert summary["comparisons"]["full"]["ln"]["n"] == 8  # chosen full against chosen ln, on the same 8 questions
    assert "report.md" in capsys.readouterr().out or (tmp_path / "tiny-cpu" / "report.md").exists()
    # `raymed.tune.report DIR` rebuilds the very results.json the sweep wrote, stopped trials included.
    from raymed.tune.report import main as report_main

    first = (tmp_path / "tiny-cpu" / "results.json").read_text()
    (tmp_path / "tiny-cpu" / "results.json").unlink()
    assert report_main([str(tmp_path / "tiny-cpu"), "--metric", "loss", "--mode", "min"]) == 0
    assert (tmp_path / "tiny-cpu" / "results.json").read_text() == first
    assert (tmp_path / "tiny-cpu" / "curves.png").is_file()
    # Each method's best trial, rebuilt from its checkpoint, answers the sweep's own test questions as the
    # trial did (one question of slack: greedy ties may break differently with another thread count).
    doc = questions.run(tmp_path / "tiny-cpu")
    assert doc["config"]["sweeps_own_test_set"] and doc["config"]["rows"] == 8
    assert sum(doc["config"]["type_counts"].values()) == 8
    by = {r["method"]: r for r in doc["rows"]}
    assert set(by) == {"zero-shot", "full", "ln"}
    for name in ("full", "ln"):
        r = by[name]
        assert abs(r["overall"] - r["sweep_acc"]) <= 1 / 8 + 1e-9, r
        assert r["gained"] - r["lost"] == round((r["overall"] - by["zero-shot"]["overall"]) * 8)
        best = summary["best_per_method"][name]
        assert r["trainable"] == next(t for t in rows if t["trial_id"] == best)["params"]["trainable"]
    # Tune kills each trial's Ray Train controller (ASHA stop, last epoch): the workers' placement groups
    # must still be removed, or every trial leaks its CPUs until a small cluster deadlocks.
    _assert_all_cpus_return()


def _assert_all_cpus_return(timeout_s: float = 60.0) -> None:
    import time

    import ray

    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(1.0)
    leaked = {pg_id: pg["bundles"] for pg_id, pg in ray.util.placement_group_table().items()
              if pg["state"] != "REMOVED"}
    assert ray.available_resources().get("CPU", 0.0) == total, f"CPUs still held by placement groups: {leaked}"


def test_resource_request_the_cluster_can_never_satisfy(ray_cluster, tmp_path, capsys):
    assert tune_main(["--config", str(SWEEP), "--out", str(tmp_path), "scaling.num_workers=16"]) == 2
    err = capsys.readouterr().err
    assert "each trial needs 8.55 CPUs" in err and "the cluster holds at most its nodes: 4 CPU" in err
