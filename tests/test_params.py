"""Accounting: group partition, exact counts (docs/DESIGN.md §2), the CLI and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch

from raymed.models.methods import MethodError, apply_method
from raymed.models import GROUPS, PRESETS, ModelLoadError, load_model, resolve
from raymed.models.params import main


def run_cli(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_groups_partition_parameters(name):
    ref = resolve(name)
    model = load_model(ref, device="meta" if ref.preset.meta_only else "cpu")
    infos = ref.family.classify(model)
    names = [i.name for i in infos]
    assert len(names) == len(set(names)), "a parameter was classified twice"
    assert set(names) == {n for n, _ in model.named_parameters()}
    assert sum(i.numel for i in infos) == sum(p.numel() for p in model.parameters())
    assert {i.group for i in infos} <= set(GROUPS)
    assert {i.tower for i in infos} == set(ref.family.towers)


def test_full_size_reference_counts():
    """Analytic counts from docs/DESIGN.md §2, checked on meta-device models."""
    for name, towers in {
        "miss-base": {"vision": 86.34e6, "text_encoder": 137.26e6, "text_decoder": 137.88e6},
    }.items():
        ref = resolve(name)
        infos = ref.family.classify(load_model(ref, device="meta"))
        per_tower = Counter()
        ln = Counter()
        for i in infos:
            per_tower[i.tower] += i.numel
            if i.group == "ln":
                ln[i.tower] += i.numel
        assert round(sum(per_tower.values()) / 1e6, 2) == 361.48
        for tower, n in towers.items():
            assert round(per_tower[tower] / 1e4) == round(n / 1e4)
        assert ln == {"vision": 38_400, "text_encoder": 56_832, "text_decoder": 58_368}
    ref = resolve("llava-med-v1.5")
    infos = ref.family.classify(load_model(ref, device="meta"))
    vision_ln = sum(i.numel for i in infos if i.group == "ln" and i.tower == "vision")
    assert vision_ln == 102_400
    unused = {i.name for i in infos if i.unused}
    assert "model.vision_tower.post_layernorm.weight" in unused
    assert all(".layers.23." in n or "post_layernorm" in n for n in unused)
    assert not any(".layers.22." in n for n in unused)


def test_cli_reference_numbers(capsys):
    assert run_cli(capsys, "--model", "miss-base", "--method", "ln")["trainable"] == 153_600
    assert run_cli(capsys, "--model", "miss-base", "--method", "ln", "--towers", "text_encoder,text_decoder")[
        "trainable"] == 115_200
    lang = run_cli(capsys, "--model", "llava-med-v1.5", "--method", "ln", "--towers", "language")
    assert lang["trainable"] == 266_240
    assert lang["groups"]["language"]["ln"] == 266_240
    every = run_cli(capsys, "--model", "llava-med-v1.5", "--method", "ln")
    assert every["trainable"] == 362_496 == 266_240 + 2_048 + 23 * 2 * 2_048
    assert every["trainable_groups"]["vision"]["ln"] == 96_256
    assert every["unused"] > 0 and "model.vision_tower.post_layernorm.bias" in every["unused_names"]


def test_cli_as_a_module_and_list():
    out = subprocess.run(
        [sys.executable, "-m", "raymed.models.params", "--model", "tiny-llava", "--method", "ln"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "trainable 640 of 150,560" in out and "unused" in out
    listing = subprocess.run([sys.executable, "-m", "raymed.models.params", "--list"], capture_output=True, text=True,
                             check=True).stdout
    for word in ("llava", "miss", "tiny-miss", "llava-med-v1.5", "lora", "peft-ln", "ia3"):
        assert word in listing


def _lin(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


# Expected trainable counts derived from the tiny configs (vision CLIP/ViT 32-d, FFN 64, 8 px patches at
# 32 px; tiny-llava: 3 CLIP layers of which the last is unused, Mistral 64-d x 2 layers, 2 KV heads of 16;
# tiny-miss: 2 ViT layers, BERT 32-d x 2 layers in encoder and decoder). r=8 for LoRA.
R = 8
LLAVA = {
    "ln": (64 + 2 * 2 * 64) + (2 * 2 * 64 + 64),
    "attn": 2 * 4 * _lin(32, 32) + 2 * (2 * 64 * 64 + 2 * 64 * 32),
    "ffn": 2 * (_lin(32, 64) + _lin(64, 32)) + 2 * 3 * 64 * 128,
    "full": 150_560 - 8_608,  # all minus the unused last CLIP layer and post_layernorm
    "lora": 2 * 4 * R * (32 + 32) + 2 * R * (2 * (64 + 64) + 2 * (64 + 32)),
    # (IA)3: key and value outputs, FFN down-projection inputs (vision: 2 used CLIP layers; language: 2 layers).
    "ia3": 2 * (32 + 32 + 64) + 2 * (32 + 32 + 128),
    "prefix": 10 * 32 + _lin(32, 64) + _lin(64, 2 * 2 * 32),  # token dim = KV width 32, projection 64
    "p-tuning-v2": 10 * 2 * 2 * 32,
    "prompt": 10 * 64,
    "ln+attn": None,
}
MISS = {
    "ln": (2 * 2 * 64 + 64) + (64 + 2 * 3 * 64) + (64 + 2 * 3 * 64 + 64),
    "attn": 2 * (_lin(32, 96) + _lin(32, 32)) + 2 * 2 * 8 * _lin(32, 32),
    "ffn": 3 * 2 * (_lin(32, 64) + _lin(64, 32)),
    "full": 99_881,
    "lora": 2 * R * ((32 + 96) + (32 + 32)) + 2 * 2 * 8 * R * (32 + 32),
    # (IA)3: vision attention is one fused qkv (not scaled): FFN fc2 inputs only; text towers: self- and
    # cross-attention key and value outputs plus the FFN output.dense inputs.
    "ia3": 2 * 64 + 2 * 2 * (4 * 32 + 64),
    # prefix / p-tuning-v2: question encoder and answer decoder each (the MISS authors' models/peft_miss.py)
    "prefix": 2 * (10 * 32 + _lin(32, 32) + _lin(32, 2 * 2 * 32)),
    "p-tuning-v2": 2 * 10 * 2 * 2 * 32,
    "prompt": 10 * 32,
    "ln+attn": None,
}


@pytest.mark.parametrize("model_name,table", [("tiny-llava", LLAVA), ("tiny-miss", MISS)])
@pytest.mark.parametrize("method", list(LLAVA) + ["peft-ln"])
def test_exact_trainable_counts(model_name, table, method):
    ref = resolve(model_name)
    model, acc = apply_method(load_model(ref), ref, method)
    expected = table["ln"] if method == "peft-ln" else table[method]
    if method == "ln+attn":
        expected = table["ln"] + table["attn"]
    assert acc.trainable == expected
    assert acc.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(sum(g.values()) for g in acc.trainable_groups.values()) == acc.trainable


def test_peft_ln_trains_the_same_parameters_as_ln():
    for name in ("tiny-llava", "tiny-miss"):
        ref = resolve(name)
        _, ln = apply_method(load_model(ref), ref, "ln", ["vision", ref.family.name == "llava" and "language"
                                                           or "text_decoder"])
        model, pln = apply_method(load_model(ref), ref, "peft-ln", ln.towers)
        assert pln.trainable == ln.trainable
        hosts = {n.split(".ln_tuning_layers.")[0].replace("base_model.model.", "", 1)
                 for n, p in model.named_parameters() if p.requires_grad}
        plain, _ = apply_method(load_model(ref), ref, "ln", ln.towers)
        ln_hosts = {n.rsplit(".", 1)[0] for n, p in plain.named_parameters() if p.requires_grad}
        assert hosts == ln_hosts


def test_towers_restrict_methods():
    ref = resolve("tiny-llava")
    _, acc = apply_method(load_model(ref), ref, "ln", ["language"])
    assert acc.trainable == 2 * 2 * 64 + 64
    assert acc.trainable_groups["vision"]["ln"] == 0
    _, lora = apply_method(load_model(ref), ref, "lora", ["language"])
    assert lora.trainable_groups["vision"].get("adapter", 0) == 0 and lora.trainable_groups["language"]["adapter"] > 0


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_adapter_init_depends_on_the_seed_only(method):
    # A pretrained base is loaded, not built from a seed: the adapter's random init must not follow whatever
    # the global RNG went through before (it did: two runs of the same sweep trained different LoRAs).
    ref = resolve("tiny-llava-med")

    def adapter(seed, global_seed):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        model, _ = apply_method(load_model(ref), ref, method, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG stream is left alone
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    a, b, other = adapter(0, global_seed=1), adapter(0, global_seed=2), adapter(1, global_seed=1)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], other[n]) for n in a)


def test_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        resolve("nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="model_type 'bert' is not supported"):
        resolve(str(tmp_path))
    ref = resolve("tiny-llava")
    with pytest.raises(MethodError, match="unknown method 'lorra'"):
        apply_method(load_model(ref), ref, "lorra")
    with pytest.raises(MethodError, match=r"family 'llava', method 'attn', towers \['projector'\]: no parameter"):
        apply_method(load_model(ref), ref, "attn", ["projector"])
    with pytest.raises(MethodError, match=r"unknown tower\(s\) \['text_encoder'\]"):
        apply_method(load_model(ref), ref, "ln", ["text_encoder"])
    with pytest.raises(MethodError, match="no module of group"):
        apply_method(load_model(ref), ref, "lora", ["projector"])
    with pytest.raises(ModelLoadError, match="accounting only"):
        load_model("llava-med-v1.5")
    assert main(["--model", "tiny-miss", "--method", "nope"]) == 2


def test_miss_paper_baselines_target_the_named_modules():
    """lora-qv: query/value of the text towers (self- and cross-attention); ia3-kvo: key/value/output.dense with
    every output.dense scaled as feed-forward (TIMMY-CHAN/MISS models/peft_miss.py); both leave the ViT alone."""
    import peft

    ref = resolve("tiny-miss")
    model, acc = apply_method(load_model(ref), ref, "lora-qv")
    lora = {n.rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(n.endswith((".query", ".value")) and ".vision_model." not in n for n in lora)
    # 2 text towers x 2 layers x (self + cross) x (query + value) = 16 adapted linears of 32 x 32, r = 4
    assert len(lora) == 16 and acc.trainable == 16 * 4 * (32 + 32)
    model, acc = apply_method(load_model(ref), ref, "ia3-kvo")
    cfg = model.peft_config["default"]
    assert isinstance(cfg, peft.IA3Config) and set(cfg.feedforward_modules) <= set(cfg.target_modules)
    assert {t.rsplit(".", 2)[-2] + "." + t.rsplit(".", 1)[-1] for t in cfg.feedforward_modules} == {"output.dense"}
    assert not any("vision_model" in t for t in cfg.target_modules)
    # per text layer: key, value (self + cross, 32 each), 3 x output.dense as feed-forward (inputs 32, 32, 64)
    assert acc.trainable == 2 * 2 * (4 * 32 + 32 + 32 + 64)
    with pytest.raises(MethodError, match="applies to family miss, not 'llava'"):
        apply_method(load_model("tiny-llava"), resolve("tiny-llava"), "lora-qv")
