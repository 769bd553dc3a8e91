"""Benchmark suites at tiny sizes: the JSON they write, and numbers that hang together. No timing asserts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from raymed.bench import common
from raymed.bench.overhead import epoch_rates
from raymed.tables import table


def check_document(doc: dict, suite: str) -> None:
    """Every suite's document: suite, command, config, machine (with load and versions), rows, targets."""
    assert doc["suite"] == suite
    assert doc["command"].split()[1:3] == ["-m", "raymed.bench"]
    m = doc["machine"]
    assert m["cores"] >= 1 and m["cpu"] and len(m["load_average"]) == 3
    assert m["versions"]["torch"] and m["versions"]["ray"]
    assert doc["wall_s"] >= 0
    for t in doc["targets"]:
        assert set(t) >= {"name", "value", "target", "met"}
        if isinstance(t["value"], float):
            limit = float(t["target"].split()[1])
            assert t["met"] == (t["value"] <= limit if t["target"].startswith("<=") else t["value"] >= limit)
    json.dumps(doc)  # serialisable as written


def accounting(model: str, method: str, towers: list[str] | None = None) -> int:
    from raymed.models.methods import apply_method
    from raymed.models import load_model

    ref = common.model_ref(model)
    return apply_method(load_model(ref), ref, method, towers)[1].trainable


# ---- unit ----------------------------------------------------------------------------------------
def test_bench_model_is_llava_sized_for_cpu_benchmarks():
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(common.bench_llava_config())
    n = sum(p.numel() for p in model.parameters())
    assert 50e6 <= n <= 100e6
    ref = common.model_ref(common.BENCH_MODEL)
    assert ref.family.name == "llava" and ref.name == common.BENCH_MODEL


def test_table_and_targets_render():
    rows = [{"a": "x", "b": 1234567, "c": 0.5}, {"a": "longer", "b": 2, "c": float("nan")}]
    text = table(rows, [("a", "A"), ("b", "B"), ("c", "C")])
    assert "1,234,567" in text and "longer" in text and text.count("\n") == 3
    t = common.target("ratio", 0.7, 0.72, "<=")
    assert t["met"] and not common.target("ratio", 0.8, 0.9, ">=")["met"]


def test_epoch_rates_undo_cumulative_reports():
    # 10 samples per epoch: epoch 1 took 5 s, epoch 2 took 2 s -> cumulative 2.0 then 20/7 samples/s
    history = [{"samples_per_s": 2.0}, {"samples_per_s": 20 / 7}]
    assert epoch_rates(history, 10) == pytest.approx([2.0, 5.0])


def test_gpu_suite_skips_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    from raymed.bench import gpu

    doc = gpu.run()
    assert doc["skipped"].startswith("skipped: no CUDA") and doc["rows"] == []
    check_document(doc, "gpu")
    assert "skipped" in gpu.render(doc)


def test_methods_suite_tiny():
    from raymed.bench import methods

    doc = methods.run(model="tiny-llava", variants=("ln", "full", "ln@language"), steps=2, warmup=1, repeats=1)
    check_document(doc, "methods")
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"full", "ln", "ln@language"} and not any("error" in r for r in rows.values())
    assert rows["full"]["trainable"] == accounting("tiny-llava", "full")
    assert rows["ln"]["trainable"] == accounting("tiny-llava", "ln")
    assert rows["ln@language"]["trainable"] == accounting("tiny-llava", "ln", ["language"])
    memory, rounds = doc["memory"], doc["timing"][0]["rounds"]
    assert len(doc["timing"]) == 1 and len(rounds) == 2
    for i, (v, row) in enumerate(rows.items()):
        assert len(memory[v]["step_s"]) == 2 and all(s > 0 for s in memory[v]["step_s"])
        assert row["train_mem_mb"] >= 0 and row["loaded_mb"] > 0
        assert row["step_s"] == pytest.approx(common.median([rd[i]["wall"] for rd in rounds]))
        assert row["step_ratio"] == pytest.approx(common.median([rd[i]["wall"] / rd[0]["wall"] for rd in rounds]))
        assert row["mem_ratio"] == pytest.approx(memory[v]["train_mem_mb"] / memory["full"]["train_mem_mb"])
        assert row["adamw_state_mb"] == pytest.approx(12 * row["trainable"] / 2**20)
    # Cost model: full needs every gradient; ln all input gradients but no weight gradients; ln on the
    # language tower alone needs no backward through the vision tower.
    assert rows["full"]["flops_ratio"] == 1.0
    assert 0.5 < rows["ln"]["flops_ratio"] < 0.75
    assert rows["ln@language"]["flops_ratio"] < rows["ln"]["flops_ratio"]
    assert {t["name"] for t in doc["targets"]} == {"ln/full step time", "ln/full training memory"}
    assert "ln@language" in methods.render(doc)


# ---- integration (real DeepSpeed with gloo; real Ray) -----------------------------------------------
@pytest.mark.integration
def test_checkpoint_suite_cli(tmp_path: Path):
    out = tmp_path / "ckpt.json"
    proc = subprocess.run([sys.executable, "-m", "raymed.bench", "checkpoint", "--model", "tiny-llava",
                           "--methods", "full ln lora", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model/ x" in proc.stdout  # the table
    doc = json.loads(out.read_text())
    check_document(doc, "checkpoint")
    rows = {r["method"]: r for r in doc["rows"]}
    for method, row in rows.items():
        assert row["trainable"] == accounting("tiny-llava", method)
        assert row["trainable_bytes"] == 4 * row["trainable"]  # fp32
        # Only trainable tensors are stored: tensor data + a small safetensors header.
        assert row["trainable_bytes"] < row["tensor_bytes"] < row["trainable_bytes"] + 64 * 1024
        assert row["model_bytes"] >= row["tensor_bytes"] + row["adapter_bytes"]
        assert row["resume_bytes"] > 2 * row["trainable_bytes"]  # weights + AdamW moments at least
        assert row["model_ratio"] == pytest.approx(row["model_bytes"] / row["trainable_bytes"])
    assert all(r["adapter_bytes"] == 0 for r in rows.values())  # each trainable tensor is stored once


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already initialised in this process")
    from raymed.cluster import start_local_ray

    start_local_ray(num_cpus=4, log_to_driver=False,
                    runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_data_suite_tiny(ray_cluster):
    from raymed.bench import data

    doc = data.run(model="tiny-llava", images=10, image_size=64, batch_size=8, workers=2, shards=2, repeats=1,
                   epochs=2)
    check_document(doc, "data")
    rows = {r["key"]: r for r in doc["rows"]}
    assert set(rows) == {"ray_data", "ray_tasks", "trainer", "dataloader"}
    for key, row in rows.items():  # 10 images: 2 test, 1 of the 8 train images carved into val, 3 questions each
        assert row["rows"] == doc["config"]["train_rows"] == 21
        assert row["images_per_s"] > 0 and row["first_batch_s"] >= 0
        passes = doc["runs"][key][0]
        assert len(passes) == 2 and all(p["rows"] == 21 for p in passes)
        assert passes[-1]["images_per_s"] == pytest.approx(21 / passes[-1]["total_s"])
        assert row["ratio"] == pytest.approx(passes[-1]["images_per_s"] / doc["runs"]["dataloader"][0][-1]["images_per_s"])
    assert rows["dataloader"]["ratio"] == 1.0
    runs = doc["runs"]
    assert rows["trainer"]["run_ratio"] == pytest.approx(sum(p["total_s"] for p in runs["dataloader"][0])
                                                         / sum(p["total_s"] for p in runs["trainer"][0]))


@pytest.mark.integration
def test_overhead_suite_tiny(ray_cluster):
    from raymed.bench import overhead

    doc = overhead.run(model="tiny-llava", images=10, batch_size=8, epochs=2, zero_stages=("2", "2!"),
                       cpus_per_worker=1, threads=1)
    check_document(doc, "overhead")
    plain, ds, forced = doc["rows"]
    assert plain["samples_per_s"] > 0 and ds["samples_per_s"] > 0 and forced["samples_per_s"] > 0
    assert (ds["ran_stage"], forced["ran_stage"]) == (0, 2)  # one fp32 worker runs stage 0 unless forced
    # a fair comparison: the worker's torch threads follow its CPUs (as the plain loop's), and both sides trained on
    # the same batch shapes (the padding fraction over all epochs is a function of them; 21 rows cut 3 ways)
    assert plain["threads"] == ds["threads"] == forced["threads"] == 1
    assert ds["same_batches"] and forced["same_batches"] and 0 < plain["padding_fraction"] < 1
    startup = doc["raymed"]["2"][0]["startup"]
    assert len(startup["first_batch_s"]) == 2 and 0 < startup["worker_setup_s"] and startup["rest_s"] > 0
    assert [t["name"] for t in doc["targets"]] == ["raymed ZeRO-2 / plain loop"]
    run = doc["raymed"]["2"][0]
    assert run["trainable"] == doc["plain"][0]["trainable"] == accounting("tiny-llava", "full")
    assert len(run["epoch_rates"]) == 2 and run["samples_per_epoch"] == doc["config"]["train_rows"] == 21
    assert ds["ratio"] == pytest.approx(run["samples_per_s"] / doc["plain"][0]["samples_per_s"])
    assert 0 < run["train_s"] < run["wall_s"]


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_suite_tiny(ray_cluster, tmp_path: Path):
    from raymed.bench import sweep

    doc = sweep.run(overrides=("data.synth_n=12", "data.max_eval_rows=4", "data.synth_ood_style=null",
                               "train.zero_shot=false", "train.batch_size=8"),
                    methods=["ln", "lora"], epochs=2, quick=True)
    check_document(doc, "sweep")
    grid, asha = doc["rows"]
    assert grid["trials"] == asha["trials"] == 2 and grid["trial_epochs"] == 4
    assert 2 <= asha["trial_epochs"] <= 4 and asha["ratio"] == asha["trial_epochs"] / 4
    assert grid["best_method"] in ("ln", "lora") and not math.isnan(grid["best_value"])
    assert all(r["grid_trial_epochs"] == 4 for r in doc["replay"])
