"""The training recipe end to end: real Ray Train (V2) workers, real DeepSpeed ZeRO with gloo on CPU."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raymed.train.checkpoint import load_trainable
from raymed.cluster import start_local_ray
from raymed.config import ConfigError, load_config
from raymed.train.export import main as export_main
from raymed.models.methods import apply_method
from raymed.models import load_model, resolve
from raymed.train.launch import fit
from tests.conftest import tiny_batch

pytestmark = pytest.mark.integration

BASE = [
    "data.synth_n=20", "data.max_eval_rows=4", "data.synth_ood_style=null", "data.preprocess_actors=0",
    "train.epochs=2", "train.batch_size=8", "train.lr=5e-3", "train.zero_shot=false", "train.eval_every=2",
    "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "run.metrics_export=false",
]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    start_local_ray(num_cpus=4, log_to_driver=False,
                    runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
    yield tmp_path_factory.mktemp("runs")
    ray.shutdown()


def run(storage: Path, name: str, *overrides: str) -> dict:
    cfg = load_config(None, [*BASE, f"run.storage={storage}", f"run.name={name}", *overrides])
    return fit(cfg)


def _safetensors_data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its JSON header)."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - header_len


# Two workers, every family on both ZeRO stages, four methods (intrinsic, peft, full): 4 runs, ~40 s each on 2 cores.
# Every method of every shipped grid trains on one worker in the shipped-config tier (tests/test_shipped.py).
MATRIX = [("ln", "tiny-llava", 2), ("lora", "tiny-miss", 3), ("full", "tiny-llava", 3), ("attn", "tiny-miss", 2)]


@pytest.mark.parametrize(("method", "model_name", "stage"), MATRIX)
def test_method_matrix(ray_cluster, model_name, stage, method):
    summary = run(ray_cluster, f"{model_name}-{method}-z{stage}", f"model.name={model_name}",
                  f"method.name={method}", f"deepspeed.zero_stage={stage}", "run.save_full_model=true")
    losses = [h["loss"] for h in summary["history"]]
    assert summary["steps"] == 6 and len(losses) == 2
    assert losses[1] < losses[0], f"loss did not decrease: {losses}"
    assert "eval/test/overall_acc" in summary["metrics"] and "eval/val/overall_acc" in summary["metrics"]
    # rank 0 gathers both ranks' answers: which of the 4 val and 4 test questions came out right
    assert {k: len(v["correct"]) for k, v in summary["answers"].items()} == {"eval/val": 4, "eval/test": 4}
    assert summary["history"][-1]["zero_stage"] == stage  # two workers: the stage asked for

    ckpt = Path(summary["checkpoint"]) / "model"
    trained = load_file(ckpt / "trainable.safetensors")
    everything = load_file(ckpt / "full.safetensors")
    ref = resolve(model_name)
    expected, acc = apply_method(load_model(ref), ref, method)  # same seed: the base weights of the run
    base = dict(expected.named_parameters())
    trainable = {n for n, p in base.items() if p.requires_grad}
    assert set(trained) == trainable and acc.trainable == summary["params"]["trainable"]
    for name, tensor in everything.items():
        assert tensor.shape == base[name].shape, name  # full shapes, also under ZeRO-3
        if name in trainable:
            assert torch.equal(tensor, trained[name])
            assert not torch.equal(tensor, base[name].detach()), f"trainable {name} did not change"
        else:
            assert torch.equal(tensor, base[name].detach()), f"frozen {name} changed"
    # Only trainable tensors are stored: data bytes are exactly the fp32 trainable bytes.
    assert _safetensors_data_bytes(ckpt / "trainable.safetensors") == 4 * acc.trainable
    assert not (ckpt / "adapter").exists()  # each trainable tensor is stored once


@pytest.mark.parametrize("method", ["ln", "lora"])
def test_checkpoint_rebuilds_and_exports_the_model(ray_cluster, tmp_path, method):
    summary = run(ray_cluster, f"rebuild-{method}", "model.name=tiny-miss", f"method.name={method}",
                  "deepspeed.zero_stage=3", "train.epochs=1", "train.eval_every=1", "train.zero_shot=true")
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "zeroshot" / "test" / "predictions.jsonl").is_file()  # zero-shot answers kept too
    if method == "ln":
        _eval_and_infer_reproduce_the_run(Path(ray_cluster) / "rebuild-ln", summary, tmp_path)
    model, _, meta = load_trainable(Path(summary["checkpoint"]) / "model")
    assert meta["method"] == method
    trained = load_file(Path(summary["checkpoint"]) / "model" / "trainable.safetensors")
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in trained.items())
    result = json.loads((Path(ray_cluster) / f"rebuild-{method}" / "raymed-result.json").read_text())
    assert result["params"]["trainable"] == (1280 if method == "ln" else 19_456)
    assert result["config_hash"] == summary["config_hash"]

    assert export_main(["--run", str(Path(ray_cluster) / f"rebuild-{method}"), "--out", str(tmp_path / "hf")]) == 0
    exported = load_model(str(tmp_path / "hf")).eval()
    assert not any("lora" in n for n, _ in exported.named_parameters())
    batch = tiny_batch("tiny-miss")
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).loss, exported(**batch).loss, atol=1e-5)

    # A peft adapter directory on request (peft methods only), with exactly the trained tensors.
    adapter_args = ["--run", str(Path(ray_cluster) / f"rebuild-{method}"), "--out", str(tmp_path / "adapter"),
                    "--adapter"]
    if method == "ln":
        assert export_main(adapter_args) == 2
        return
    assert export_main(adapter_args) == 0
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(tmp_path / "adapter")).peft_type == "LORA"
    assert len(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == len(trained)


def test_resume_refuses_a_changed_config_and_continues_the_schedule_when_allowed(ray_cluster):
    common = ("model.name=tiny-llava", "method.name=ln", "train.eval_every=1", "scaling.num_workers=1")
    # A run of 4 epochs (6 steps each: 42 rows, 1 worker) dies in epoch 3 (no restarts): its last checkpoint is
    # epoch 2, step 12.
    with pytest.raises(Exception):
        run(ray_cluster, "resume", *common, "train.epochs=4", "run.fail_at_step=14")
    with pytest.raises(ConfigError) as err:  # re-run with more epochs: refused before any worker starts
        run(ray_cluster, "resume", *common, "train.epochs=6", "train.lr=1e-2")
    assert "train.epochs: 4 in the checkpoint, 6 now" in str(err.value)
    assert "train.lr: 0.005 in the checkpoint, 0.01 now" in str(err.value)
    assert "run.allow_config_change" in str(err.value)

    resumed = run(ray_cluster, "resume", *common, "train.epochs=6", "run.allow_config_change=true")
    assert [h["step"] for h in resumed["history"]] == [6, 12, 18, 24, 30, 36]
    # Up to the checkpoint it resumed from (epoch 2, or epoch 1 when the crash beat Ray Train's record of the
    # epoch-2 report), the lr is the 24-step schedule's (warm-up 3 steps, 5e-3 peak); from there it continues
    # from the lr reached and decays to zero at step 36: no jump back up, no re-stretching of the first part.
    def first(step: int) -> float:
        return 5e-3 * 0.5 * (1 + math.cos(math.pi * (step - 3) / (24 - 3)))

    kept = [h["step"] for h in resumed["history"] if h["lr"] == pytest.approx(first(h["step"]), abs=1e-12)]
    at = kept[-1]
    assert at in (6, 12) and kept == [6, 12][: kept.index(at) + 1]
    for h in resumed["history"]:
        if h["step"] > at:
            expected = first(at) * 0.5 * (1 + math.cos(math.pi * (h["step"] - at) / (36 - at)))
            assert h["lr"] == pytest.approx(expected, abs=1e-12), h
    assert resumed["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_later_epochs_replay_the_first_epochs_batches(ray_cluster):
    common = ("model.name=tiny-llava", "method.name=ln", "scaling.num_workers=1", "train.epochs=3",
              "train.eval_every=3")
    cached = run(ray_cluster, "cache-on", *common)
    streamed = run(ray_cluster, "cache-off", *common, "data.cache_mb=0")
    assert all(h["data_cached_mb"] > 0 for h in cached["history"])
    assert all(h["data_cached_mb"] == 0 for h in streamed["history"])
    assert cached["history"][-1]["zero_stage"] == 0  # one fp32 worker: ZeRO-2 asked, nothing to partition
    # Replaying from memory trains on exactly what re-streaming the shard gives (one worker: a fixed order).
    assert [h["loss"] for h in cached["history"]] == pytest.approx([h["loss"] for h in streamed["history"]],
                                                                    rel=1e-6)
    # Batches are cut to their longest sample: real tokens/s below padded tokens/s, a padding fraction in [0, 1).
    h = cached["history"][-1]
    assert 0 < h["tokens_per_s"] <= h["padded_tokens_per_s"] and 0 <= h["padding_fraction"] < 1


def test_a_crashed_run_resumes_exactly(ray_cluster):
    """LoRA (dropout 0.1) on 2 workers with gradient accumulation: a worker killed mid-epoch 2 restarts from the
    epoch-1 checkpoint and ends with the very weights and losses of the uninterrupted run (RNG restored, the same
    shuffled batches). Each worker has 3 micro-batches an epoch and accumulates 2: every epoch ends on a shorter
    group (2 optimizer steps, as planned), no gradient is pending at a checkpoint, and the lr ends at 0 (it used to
    take more steps than planned and climb back up)."""
    common = ("model.name=tiny-miss", "method.name=lora", "train.eval_every=1", "train.grad_accum=2")
    clean = run(ray_cluster, "nofault", *common)
    faulty = run(ray_cluster, "fault", *common, "run.max_failures=1", "run.fail_at_step=3")
    assert (Path(ray_cluster) / "fault" / "fault-injected.txt").is_file()
    assert faulty["steps"] == clean["steps"] == 4
    assert [h["step"] for h in faulty["history"]] == [2, 4]
    assert [h["loss"] for h in faulty["history"]] == [h["loss"] for h in clean["history"]]
    assert clean["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    a = load_file(Path(clean["checkpoint"]) / "model" / "trainable.safetensors")
    b = load_file(Path(faulty["checkpoint"]) / "model" / "trainable.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # Every epoch's checkpoint carries the eval set's predictions, one record per row.
    recs = [json.loads(x) for x in (Path(clean["checkpoint"]) / "eval" / "test" / "predictions.jsonl").open()]
    assert len(recs) == 4 and {"id", "question", "reference", "prediction", "answer_type", "correct"} <= set(recs[0])
    assert sum(r["correct"] for r in recs) / 4 == pytest.approx(clean["metrics"]["eval/test/overall_acc"])


def _eval_and_infer_reproduce_the_run(run_dir: Path, summary: dict, tmp_path: Path) -> None:
    """`raymed.eval` on the run folder answers the eval set exactly as the run's own last evaluation did, and
    `raymed.eval.infer` gives the same answer to one of its questions; bad input gets a clear error."""
    from raymed.eval import evaluate as raymed_eval
    from raymed.eval import infer
    from raymed.config import Config
    from raymed.data.rows import read_split_rows
    from raymed.data.plan import data_plan

    data_dir = data_plan(Config.model_validate(summary["config"]))[0]
    out = tmp_path / "eval"
    assert raymed_eval.main(["--model", str(run_dir), "--data", data_dir, "--max-rows", "4", "--out", str(out)]) == 0
    recs = [json.loads(x) for x in (out / "predictions.jsonl").open()]
    in_run = [json.loads(x) for x in (Path(summary["checkpoint"]) / "eval" / "test" / "predictions.jsonl").open()]
    assert [(r["id"], r["prediction"]) for r in recs] == [(r["id"], r["prediction"]) for r in in_run]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["overall_acc"] == pytest.approx(summary["metrics"]["eval/test/overall_acc"])

    row = read_split_rows(data_dir, "test")[0]
    image = tmp_path / "scan.png"
    image.write_bytes(row["image"])
    assert infer.answer(str(run_dir), image, row["question"]) == in_run[0]["prediction"]

    broken = tmp_path / "broken.png"
    broken.write_bytes(row["image"][: len(row["image"]) // 3])
    with pytest.raises(infer.InferError, match="broken.png: corrupt image"):
        infer.answer(str(run_dir), broken, row["question"])
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(raymed_eval.EvalError, match="no raymed checkpoint in this folder"):
        raymed_eval.evaluate(str(tmp_path / "empty-run"), data_dir)
