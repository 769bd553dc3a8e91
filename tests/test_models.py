"""Tiny models: forward/backward per method, save/load round trips, converters from the original layouts."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from raymed.models.convert import main as convert_main
from raymed.models.methods import METHODS, apply_method
from raymed.models import load_model, load_processor, resolve
from raymed.models.base import enable_activation_checkpointing
from tests.conftest import make_rows, model_inputs, tiny_batch

TINY = ("tiny-llava", "tiny-miss")


@pytest.mark.parametrize("model_name", TINY)
@pytest.mark.parametrize("method", [*METHODS, "ln+ffn"])
def test_only_selected_parameters_get_gradients(model_name, method):
    ref = resolve(model_name)
    if method in METHODS and METHODS[method].families and ref.family.name not in METHODS[method].families:
        pytest.skip(f"{method} is a {'/'.join(METHODS[method].families)} method")
    model, acc = apply_method(load_model(ref), ref, method)
    model.train()
    out = model(**tiny_batch(model_name))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and with_grad == trainable
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable and "lora_A" not in n)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == acc.trainable


def _outputs(model, batch) -> torch.Tensor:
    """The loss and the first output tensor (LLaVA: logits; BLIP-VQA: decoder logits or image embeddings)."""
    with torch.no_grad():
        out = model(**batch)
    first = next(v for k, v in out.items() if k != "loss" and isinstance(v, torch.Tensor))
    return torch.cat([out.loss.reshape(1), first.flatten()])


@pytest.mark.parametrize("model_name", TINY)
def test_save_and_load_round_trip(model_name, tmp_path):
    ref = resolve(model_name)
    model, proc = load_model(ref), load_processor(ref)
    model.save_pretrained(tmp_path, safe_serialization=True)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded_ref = resolve(str(tmp_path))
    assert loaded_ref.family is ref.family and loaded_ref.path == tmp_path
    loaded = load_model(loaded_ref).eval()
    proc2 = load_processor(loaded_ref)
    enc1 = ref.family.encode(proc, make_rows(2), train=True, max_length=48)
    enc2 = ref.family.encode(proc2, make_rows(2), train=True, max_length=48)
    for k in enc1:
        assert (enc1[k] == enc2[k]).all(), k
    batch = model_inputs(enc1)
    assert torch.equal(_outputs(model.eval(), batch), _outputs(loaded, batch))


def _to_original_llava(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LLaVA-Med `llava_mistral` naming, written out independently of the converter's rules."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.vision_tower."):
            k = "model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower."):]
        elif k.startswith("model.multi_modal_projector.linear_1."):
            k = "model.mm_projector.0." + k.rsplit(".", 1)[1]
        elif k.startswith("model.multi_modal_projector.linear_2."):
            k = "model.mm_projector.2." + k.rsplit(".", 1)[1]
        out[k] = v
    return out


# MISS/BLIP originals (own reader, pos_embed interpolation, recipe): tests/test_miss_convert.py.
@pytest.mark.parametrize("model_name,family,to_original", [("tiny-llava", "llava", _to_original_llava)])
def test_converter_from_original_layout(model_name, family, to_original, tmp_path):
    ref = resolve(model_name)
    src = load_model(ref, seed=7).eval()  # different weights from the --config-from base (seed 0)
    original = to_original({k: v.clone().contiguous() for k, v in src.state_dict().items()})
    assert not any(k.startswith(("model.language_model", "vision_model.")) for k in original)
    save_file(original, tmp_path / "original.safetensors")
    out = tmp_path / "hf"
    assert convert_main(["--family", family, "--input", str(tmp_path / "original.safetensors"),
                         "--config-from", model_name, "--out", str(out)]) == 0
    converted = load_model(str(out)).eval()
    batch = tiny_batch(model_name)
    assert torch.equal(_outputs(src, batch), _outputs(converted, batch))
    assert not torch.equal(_outputs(load_model(ref).eval(), batch), _outputs(converted, batch))


def test_converter_rejects_unknown_keys(tmp_path):
    save_file({"something.else": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert convert_main(["--family", "miss", "--input", str(tmp_path / "x.safetensors"),
                         "--config-from", "tiny-miss", "--out", str(tmp_path / "o")]) == 2


def test_llava_family_converts_with_the_release_converters_table(tmp_path, capsys):
    """`--config-from` checkpoints and the release directory share one key table (`llava_convert.RENAMES`): buffers
    the HF model recomputes are dropped the same way, and an unknown key is refused with its name."""
    family = resolve("tiny-llava").family
    state = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(2), "model.norm.weight": torch.ones(2),
             "model.mm_projector.2.bias": torch.zeros(2)}
    assert set(family.convert_original(state)) == {"model.language_model.norm.weight",
                                                   "model.multi_modal_projector.linear_2.bias"}
    save_file({"model.mm_projector.1.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert convert_main(["--family", "llava", "--input", str(tmp_path / "x.safetensors"),
                         "--config-from", "tiny-llava", "--out", str(tmp_path / "o")]) == 2
    assert "key 'model.mm_projector.1.weight' is not part of a LLaVA-Med v1.5 checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("model_name,towers", [("tiny-llava", ["language"]), ("tiny-miss", ["text_decoder"])])
def test_gradient_checkpointing_with_frozen_first_layers(model_name, towers):
    """Non-reentrant checkpointing still gives gradients when everything before the trained tower is frozen."""
    ref = resolve(model_name)
    batch = tiny_batch(model_name)
    grads = []
    for checkpointing in (False, True):
        model, _ = apply_method(load_model(ref), ref, "ln", towers)
        if checkpointing:
            enable_activation_checkpointing(model)
            assert model.is_activation_checkpointing
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("model_name", ["tiny-llava", "tiny-miss"])
def test_prefix_tuning_trains_under_gradient_checkpointing(model_name):
    """peft hands the prefix over as a KV cache, which checkpointed layers used to drop (a size mismatch at the first
    forward): with checkpointing the loss and every gradient equal those without it."""
    ref = resolve(model_name)
    batch = tiny_batch(model_name)
    results = []
    for checkpointing in (False, True):
        model, _ = apply_method(load_model(ref), ref, "prefix", None, seed=0)
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and grads_a
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name


def test_miss_prefix_reaches_self_attention_only():
    """MISS's question encoder cross-attends to the image: the prefix (and the question's own keys) must not
    leak into that cross-attention, as BLIP's med.py gives cross-attention no cache."""
    ref = resolve("tiny-miss")
    model, _ = apply_method(load_model(ref), ref, "prefix", None, seed=0)
    batch = tiny_batch("tiny-miss")
    n_image = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    seen = []

    def record(module, args, kwargs, out):
        if kwargs.get("encoder_hidden_states") is not None:
            seen.append(out[1].shape[-1] if out[1] is not None else None)

    layer = model.text_encoder.get_base_model().encoder.layer[0].crossattention.self
    handle = layer.register_forward_hook(record, with_kwargs=True)
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            model(**batch, output_attentions=True)
    handle.remove()
    assert seen == [n_image, n_image]


def test_converter_refuses_a_checkpoint_missing_weights(tmp_path):
    ref = resolve("tiny-llava")
    original = _to_original_llava({k: v.clone().contiguous() for k, v in load_model(ref, seed=7).state_dict().items()})
    dropped = next(k for k in original if k.endswith("post_layernorm.weight") or "layers.0.mlp" in k)
    del original[dropped]
    save_file(original, tmp_path / "original.safetensors")
    assert convert_main(["--family", "llava", "--input", str(tmp_path / "original.safetensors"),
                         "--config-from", "tiny-llava", "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()


def test_lr_schedule_never_rises_past_its_end():
    from raymed.train.engine import Schedule

    schedule = Schedule.fresh(10, 2)
    values = [schedule(step) for step in range(16)]
    assert values[2] == 1.0 and values[10] == 0.0
    assert all(a >= b for a, b in zip(values[2:], values[3:])) and values[-1] == 0.0


@pytest.mark.parametrize("preset", ["tiny-miss", "tiny-llava"])
def test_drop_path_drops_whole_vision_branches_per_sample_while_training_only(preset):
    """`model.drop_path` (MISS fine-tunes its ViT with 0.1): layer i of n drops with probability rate * i / (n - 1),
    whole samples at a time, rescaled; evaluation is untouched and parameter names do not change."""
    from raymed.models import load_model
    from raymed.models.base import enable_drop_path

    model = load_model(resolve(preset))
    names = [n for n, _ in model.named_parameters()]
    vision = next(m for n, m in model.named_modules() if n.endswith(("vision_model", "vision_tower"))
                  and hasattr(m, "encoder"))
    size = vision.config.image_size
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    vision.eval()
    with torch.no_grad():
        before = vision(pixel_values=x).last_hidden_state
    layers = enable_drop_path(model, 0.99)
    assert layers == vision.config.num_hidden_layers and [n for n, _ in model.named_parameters()] == names
    first = vision.encoder.layers[0]
    assert not first.self_attn._forward_hooks and vision.encoder.layers[-1].self_attn._forward_hooks  # rate 0 at i=0
    with torch.no_grad():
        torch.testing.assert_close(vision(pixel_values=x).last_hidden_state, before)  # eval: no drop
        vision.train()
        torch.manual_seed(1)
        dropped = vision(pixel_values=x).last_hidden_state
    # per sample: some samples differ from the undropped output (at 0.99 the last layer drops nearly always)
    changed = [(dropped[i] - before[i]).abs().max().item() > 1e-4 for i in range(6)]
    assert any(changed)
