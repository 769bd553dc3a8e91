"""`raymed bench gpu` sizes its parts from the device's memory before it builds anything (`size_parts`): `full` at
the deepest language model that fits with plain GPU Adam, `ln` at the full depth, on an 80 GB and a 141 GB GPU; and
its CPU dry run (`--allow-cpu`) goes through the same sizing and child processes."""

from __future__ import annotations

import pytest

from raymed.bench import gpu
from raymed.bench.common import model_ref

H100_80GB = 85_520_809_984  # torch.cuda.get_device_properties(0).total_memory of an H100 80GB HBM3
H200_141GB = 150_754_820_096  # ... of an H200 (141 GB HBM3e)


@pytest.fixture(scope="module")
def v15():
    return gpu.model_shape(model_ref("llava-med-v1.5").preset.build_config())


def test_llava_med_v15_shape(v15):
    assert v15["layers"] == 32 and v15["hidden"] == 4096 and v15["image_tokens"] == 576
    total = v15["fixed_params"] + 32 * v15["layer_params"]
    assert 7.0e9 < total < 7.7e9  # Mistral-7B + CLIP ViT-L/14-336 + projector


@pytest.mark.parametrize("device", [H100_80GB, H200_141GB])
def test_full_fits_with_plain_adam_and_ln_at_full_depth(v15, device):
    s = gpu.size_parts(device, v15, batch=4, text_tokens=64)
    depth = s["compare_depth"]
    assert 1 <= depth < 32  # the whole 7B with Adam state (~130 GB) fits neither
    assert s["full_bytes"] <= s["budget_bytes"] < gpu.part_bytes(v15, depth + 1, s["batch"], 64, True)
    assert s["ln_full_depth_bytes"] <= s["budget_bytes"] and s["batch"] == 4


def test_sizing_follows_the_device(v15):
    small, large = (gpu.size_parts(d, v15, 4, 64) for d in (H100_80GB, H200_141GB))
    assert small["compare_depth"] < large["compare_depth"]
    assert (small["compare_depth"], large["compare_depth"]) == (14, 27)  # 18 B/param + activations, 85% headroom
    tight = gpu.size_parts(24 * 2**30, v15, 8, 64)  # ln at full depth needs a smaller batch on a 24 GiB device
    assert tight["batch"] < 8 and tight["ln_full_depth_bytes"] <= tight["budget_bytes"]
    with pytest.raises(ValueError, match="does not fit"):
        gpu.size_parts(8 * 2**30, v15, 4, 64)


@pytest.mark.integration
def test_allow_cpu_dry_run_sizes_and_runs_every_part():
    import torch

    if torch.cuda.is_available():
        pytest.skip("the dry run is the CPU path")
    shape = gpu.model_shape(model_ref("tiny-llava").preset.build_config())
    assert shape["layers"] >= 2
    # memory for full at one layer less than the model has: the compared parts run shallower than ln's last run
    need = gpu.part_bytes(shape, shape["layers"] - 1, 2, 8, True) / gpu.HEADROOM
    doc = gpu.run(model="tiny-llava", batch_size=2, text_tokens=8, steps=1, warmup=1, allow_cpu=True,
                  with_recipe=False, device_gb=(need + 1) / 2**30, parts=("full", "ln"))
    rows = doc["rows"]
    assert [(r["method"], r["language_layers"]) for r in rows] == [
        ("full", shape["layers"] - 1), ("ln", shape["layers"] - 1), ("ln", shape["layers"])]
    assert not any("error" in r for r in rows), rows
    assert rows[1]["step_ratio"] is not None and rows[0]["trainable"] > rows[1]["trainable"]
    assert "layers" in gpu.render(doc)
