"""The training recipe end to end: real Ray Train (V2) workers, real DeepSpeed ZeRO with gloo on CPU."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raymed.checkpoint import load_trainable
from raymed.config import load_config
from raymed.export import main as export_main
from raymed.methods import apply_method
from raymed.models import load_model, resolve
from raymed.train import fit, start_local_ray
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


# Pairwise cover of method x family x ZeRO stage: every method on both families and both stages, every family
# on both stages (8 runs instead of 16: each Ray Train run costs ~30 s of CI on 2 cores).
MATRIX = [("ln", "tiny-llava", 2), ("ln", "tiny-miss", 3), ("attn", "tiny-llava", 3), ("attn", "tiny-miss", 2),
          ("lora", "tiny-llava", 2), ("lora", "tiny-miss", 3), ("full", "tiny-llava", 3), ("full", "tiny-miss", 2)]


@pytest.mark.parametrize(("method", "model_name", "stage"), MATRIX)
def test_method_matrix(ray_cluster, model_name, stage, method):
    summary = run(ray_cluster, f"{model_name}-{method}-z{stage}", f"model.name={model_name}",
                  f"method.name={method}", f"deepspeed.zero_stage={stage}", "run.save_full_model=true")
    losses = [h["loss"] for h in summary["history"]]
    assert summary["steps"] == 6 and len(losses) == 2
    assert losses[1] < losses[0], f"loss did not decrease: {losses}"
    assert "eval/test/overall_acc" in summary["metrics"]
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
                  "deepspeed.zero_stage=3", "train.epochs=1", "train.eval_every=1")
    model, _, meta = load_trainable(Path(summary["checkpoint"]) / "model")
    assert meta["method"] == method
    trained = load_file(Path(summary["checkpoint"]) / "model" / "trainable.safetensors")
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in trained.items())
    result = json.loads((Path(ray_cluster) / f"rebuild-{method}" / "result.json").read_text())
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


def test_resume_continues_from_the_last_epoch(ray_cluster):
    first = run(ray_cluster, "resume", "model.name=tiny-llava", "method.name=ln", "train.eval_every=1")
    assert [h["epoch"] for h in first["history"]] == [1, 2] and first["steps"] == 6
    second = run(ray_cluster, "resume", "model.name=tiny-llava", "method.name=ln", "train.eval_every=1",
                 "train.epochs=4")
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4]
    assert [h["step"] for h in second["history"]] == [3, 6, 9, 12]
    assert second["history"][:2] == first["history"]


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


def test_worker_crash_restarts_from_checkpoint(ray_cluster):
    clean = run(ray_cluster, "nofault", "model.name=tiny-miss", "method.name=lora")
    faulty = run(ray_cluster, "fault", "model.name=tiny-miss", "method.name=lora", "run.max_failures=1",
                 "run.fail_at_step=5")
    assert (Path(ray_cluster) / "fault" / "fault-injected.txt").is_file()
    assert faulty["steps"] == clean["steps"] == 6
    assert [h["step"] for h in faulty["history"]] == [3, 6]
