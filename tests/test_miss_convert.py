"""Original MISS / BLIP checkpoints → transformers: a tiny checkpoint in MISS's own on-disk layout
(tests/fixtures/miss_release.py), converted, loaded in plain transformers, and checked against a forward pass
written here by hand from the original weights."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BlipForQuestionAnswering

from raymed.models.convert import main as convert_main
from raymed.models import load_model, load_processor, resolve
from raymed.models.miss import MISS_ORIGINAL, trim_questions
from raymed.models.vocab import build_bert_tokenizer
from tests.fixtures.miss_release import (CONSTRUCTED, D, GRID, HEADS, LAYERS, OLD_GRID, PATCH, TOL,
                                         RoundTripConfig, original_state_dict, target_dir)


# ---- the independent computation: BLIP's forward written out with torch ops on the ORIGINAL keys -------------
def _ln(x, sd, p, eps):
    return F.layer_norm(x, (D,), sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _linear(x, sd, p):
    return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]


def _heads(x):
    b, n, _ = x.shape
    return x.view(b, n, HEADS, D // HEADS).transpose(1, 2)


def _attend(q, k, v, bias=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
    if bias is not None:
        s = s + bias
    return (s.softmax(-1) @ v).transpose(1, 2).flatten(2)


def blip_vision(sd, pixels):
    """salesforce/BLIP models/vit.py VisionTransformer.forward, eps 1e-6, pos_embed resized as interpolate_pos_embed."""
    pos = sd["visual_encoder.pos_embed"]
    grid_tokens = pos[:, 1:].reshape(1, OLD_GRID, OLD_GRID, D).permute(0, 3, 1, 2)
    grid_tokens = F.interpolate(grid_tokens, size=(GRID, GRID), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:, :1], grid_tokens.permute(0, 2, 3, 1).reshape(1, GRID * GRID, D)], dim=1)
    x = F.conv2d(pixels, sd["visual_encoder.patch_embed.proj.weight"], sd["visual_encoder.patch_embed.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual_encoder.cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + pos
    for i in range(LAYERS):
        b = f"visual_encoder.blocks.{i}"
        h = _ln(x, sd, f"{b}.norm1", 1e-6)
        qkv = _linear(h, sd, f"{b}.attn.qkv").view(x.shape[0], x.shape[1], 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        x = x + _linear(_attend(qkv[0], qkv[1], qkv[2]), sd, f"{b}.attn.proj")
        h = _ln(x, sd, f"{b}.norm2", 1e-6)
        x = x + _linear(F.gelu(_linear(h, sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")
    return _ln(x, sd, "visual_encoder.norm", 1e-6)


def blip_bert(sd, prefix, ids, mask, enc, enc_mask=None, causal=False):
    """BLIP's models/med.py BertModel: self-attention (padding / causal mask), cross-attention, FFN; eps 1e-12."""
    n = ids.shape[1]
    x = sd[f"{prefix}.embeddings.word_embeddings.weight"][ids] + sd[f"{prefix}.embeddings.position_embeddings.weight"][:n]
    x = _ln(x, sd, f"{prefix}.embeddings.LayerNorm", 1e-12)
    keep = mask[:, None, None, :].bool()
    if causal:
        keep = keep & torch.ones(n, n, dtype=torch.bool).tril()
    bias = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    enc_bias = None if enc_mask is None else torch.zeros(enc_mask.shape)[:, None, None, :].masked_fill(
        ~enc_mask[:, None, None, :].bool(), torch.finfo(torch.float32).min)
    for i in range(LAYERS):
        b = f"{prefix}.encoder.layer.{i}"
        for att, kv, att_bias in (("attention", x, bias), ("crossattention", enc, enc_bias)):
            q, k, v = (_heads(_linear(src, sd, f"{b}.{att}.self.{p}")) for src, p in
                       ((x, "query"), (kv, "key"), (kv, "value")))
            x = _ln(_linear(_attend(q, k, v, att_bias), sd, f"{b}.{att}.output.dense") + x, sd,
                    f"{b}.{att}.output.LayerNorm", 1e-12)
        h = F.gelu(_linear(x, sd, f"{b}.intermediate.dense"))
        x = _ln(_linear(h, sd, f"{b}.output.dense") + x, sd, f"{b}.output.LayerNorm", 1e-12)
    return x


def blip_lm_logits(sd, hidden):
    h = _ln(F.gelu(_linear(hidden, sd, "text_decoder.cls.predictions.transform.dense")), sd,
            "text_decoder.cls.predictions.transform.LayerNorm", 1e-12)
    return h @ sd["text_decoder.cls.predictions.decoder.weight"].T + sd["text_decoder.cls.predictions.bias"]


# ---- tests -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("miss")
    target = target_dir(root)
    sd = original_state_dict(len(build_bert_tokenizer()))
    ckpt = root / "model_base_vqa.pth"
    torch.save({"model": sd, "config": RoundTripConfig(image_size=480, vit="base")}, ckpt)
    return root, target, sd, ckpt


def test_weights_only_loading_refuses_the_fixture(converted):
    _, _, _, ckpt = converted
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)


def test_original_checkpoint_converts_and_matches_blip_by_hand(converted, capsys):
    root, target, sd, ckpt = converted
    out = root / "hf"
    assert convert_main(["--family", "miss", "--input", str(ckpt), "--config-from", str(target),
                         "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not CONSTRUCTED  # the pickled config object was never built: no code from the file ran
    assert f"objects not built: {RoundTripConfig.__module__}.RoundTripConfig" in printed
    assert "dropped pretraining-only weights: image_queue (1 tensor), itm_head (2 tensors), queue_ptr (1 tensor)" \
        in printed
    assert "text_encoder_m (1 tensor)" in printed and "visual_encoder_m (2 tensors)" in printed
    assert "visual_encoder.pos_embed interpolated (bicubic) from 17 to 65 positions" in printed
    report = json.loads((out / "conversion.json").read_text())
    assert sorted(report["dropped_buffers"]) == ["text_decoder.bert.embeddings.position_ids",
                                                 "text_encoder.embeddings.position_ids"]
    assert {"vision_proj.weight", "text_proj_m.bias", "temp", "text_queue"} <= set(report["dropped_pretraining"])

    model = BlipForQuestionAnswering.from_pretrained(out).eval()  # plain transformers
    assert model.config.text_config.label_smoothing == 0.1 and model.config.vision_config.layer_norm_eps == 1e-6
    pixels = torch.rand(2, 3, GRID * PATCH, GRID * PATCH) / 255  # MISS's pixel range
    proc = load_processor(resolve(str(out)))
    ids = torch.tensor([[proc.tokenizer.convert_tokens_to_ids("[ENC]"), 40, 41, 42, 3],
                        [proc.tokenizer.convert_tokens_to_ids("[ENC]"), 43, 3, 0, 0]])
    mask = (ids != 0).long()
    dec_ids = torch.tensor([[proc.tokenizer.bos_token_id, 44, 45, 3], [proc.tokenizer.bos_token_id, 46, 3, 0]])
    dec_mask = (dec_ids != 0).long()
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixels).last_hidden_state
        text = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=vision).last_hidden_state
        decoder_inputs = dict(input_ids=dec_ids, attention_mask=dec_mask, encoder_hidden_states=text,
                              encoder_attention_mask=mask)
        plain_logits = model.text_decoder(**decoder_inputs).logits
        logits = load_model(str(out)).text_decoder(**decoder_inputs).logits  # with raymed's cross-attention mask fix
        ref_vision = blip_vision(sd, pixels)
        ref_text = blip_bert(sd, "text_encoder", ids, mask, ref_vision)
        ref_logits = blip_lm_logits(sd, blip_bert(sd, "text_decoder.bert", dec_ids, dec_mask, ref_text, mask, True))
    assert vision.shape == (2, GRID * GRID + 1, D)
    torch.testing.assert_close(vision, ref_vision, **TOL)
    torch.testing.assert_close(text, ref_text, **TOL)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    # plain transformers 5.23 lets the decoder attend to the padded question positions (BLIP masks them):
    torch.testing.assert_close(plain_logits[0], ref_logits[0], **TOL)  # no padding in question 0
    assert not torch.allclose(plain_logits[1], ref_logits[1], **TOL)


def test_converted_processor_follows_miss_rules(converted):
    root, _, _, _ = converted
    ref = resolve(str(root / "hf"))
    proc = load_processor(ref)
    assert proc.miss_recipe == MISS_ORIGINAL
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)) for _ in range(2)]
    questions = ["is there a lesion in the liver?", "how many lesions are there in the left kidney and lung?"]
    enc = ref.family.encode(proc, {"image": images, "question": questions, "answer": ["yes", "two"]},
                            train=True, max_length=48)
    size = GRID * PATCH
    for i, img in enumerate(images):  # Resize((size, size)) bilinear on PIL, ToTensor(), then / 255 again
        expected = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255 / 255
        np.testing.assert_allclose(enc["pixel_values"][i], expected, rtol=1e-6, atol=1e-9)
    tok = proc.tokenizer
    for i, q in enumerate(questions):  # first token [ENC] instead of [CLS]; truncation at 35 tokens
        ids = tok(q, truncation=True, max_length=35)["input_ids"]
        assert enc["input_ids"][i, 0] == tok.convert_tokens_to_ids("[ENC]")
        assert enc["input_ids"][i, 1:len(ids)].tolist() == ids[1:]
        assert enc["attention_mask"][i].sum() == len(ids)
    batch = trim_questions({k: torch.from_numpy(v) for k, v in enc.items()}, proc.miss_recipe)
    longest = max(len(tok(q)["input_ids"]) for q in questions)
    assert batch["input_ids"].shape[1] == longest  # padding='longest' as MISS tokenizes
    assert (enc["decoder_input_ids"][:, 0] == tok.bos_token_id).all()


@pytest.mark.parametrize("damage", ["unknown key", "vocabulary", "truncated"])
def test_bad_checkpoints_fail_clearly_and_write_nothing(converted, tmp_path, capsys, damage):
    _, target, sd, ckpt = converted
    bad = tmp_path / "bad.pth"
    if damage == "unknown key":
        torch.save({"model": {**sd, "text_encoder_adapter.weight": torch.zeros(2)}}, bad)
        expected = f"{bad}: key 'text_encoder_adapter.weight' is not a MISS/BLIP-VQA weight"
    elif damage == "vocabulary":
        key = "text_encoder.embeddings.word_embeddings.weight"
        torch.save({**sd, key: torch.zeros(sd[key].shape[0] - 2, D)}, bad)  # without [DEC], [ENC]
        expected = f"{bad}: key '{key}' has {sd[key].shape[0] - 2} rows but the vocabulary has {sd[key].shape[0]}"
    else:
        data = ckpt.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        expected = f"{bad}: cannot read the checkpoint"
    out = tmp_path / "hf"
    assert convert_main(["--family", "miss", "--input", str(bad), "--config-from", str(target),
                         "--out", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))


@pytest.mark.integration
def test_one_training_run_on_the_converted_checkpoint(converted, tmp_path):
    """The converted directory trains through the real recipe (Ray Train + DeepSpeed, 1 worker) and reports every
    scoring rule."""
    import ray

    from raymed.cluster import start_local_ray
    from raymed.config import load_config
    from raymed.train.launch import fit

    root, target, _, ckpt = converted
    out = tmp_path / "hf"
    assert convert_main(["--family", "miss", "--input", str(ckpt), "--config-from", str(target),
                         "--out", str(out)]) == 0
    start_local_ray(num_cpus=2, log_to_driver=False, runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
    try:
        cfg = load_config(None, [
            f"model.name={out}", "method.name=ln", "data.synth_n=12", "data.max_eval_rows=6",
            "data.synth_ood_style=null", "data.preprocess_actors=0", "train.epochs=1", "train.batch_size=6",
            "train.lr=1e-2", "train.zero_shot=false", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
            "run.metrics_export=false", f"run.storage={tmp_path / 'runs'}", "run.name=converted-miss",
        ])
        summary = fit(cfg)
    finally:
        ray.shutdown()
    assert summary["steps"] >= 1 and math.isfinite(summary["history"][-1]["loss"])
    assert {"eval/test/closed_acc", "eval/test/closed_acc@llava-med", "eval/test/closed_acc@miss"} <= set(
        summary["metrics"])
    ln = sum(p.numel() for n, p in load_model(str(out)).named_parameters() if "norm" in n.lower())
    assert summary["params"]["trainable"] == ln


@pytest.fixture(scope="module")
def hf_dir(converted):
    from raymed.models.miss_convert import convert_miss

    root, target, _, ckpt = converted
    out = root / "hf-recipe"
    convert_miss(ckpt, str(target), out, log=lambda msg: None)
    return out


def test_converted_miss_generates_as_miss_does(hf_dir):
    """Questions as MISS tokenizes them (longest padding, [ENC]) and its decoding (3 beams, max 10, min 1),
    computed independently with transformers' generate, give the family's answers."""
    ref = resolve(str(hf_dir))
    model, proc = load_model(ref).eval(), load_processor(ref)
    rows = {"image": [Image.new("RGB", (40, 30), (i * 60, 20, 200)) for i in range(3)],
            "question": ["is there a lesion?", "how many lesions are there in the left kidney?", "which organ?"],
            "answer": ["yes", "two", "liver"]}
    enc = ref.family.encode(proc, rows, train=False, max_length=48)
    batch = {k: torch.from_numpy(v) for k, v in enc.items()}
    answers = ref.family.generate(model, proc, batch, max_new_tokens=64)

    tok = proc.tokenizer
    q = tok(rows["question"], padding="longest", truncation=True, max_length=35, return_tensors="pt")
    q["input_ids"][:, 0] = tok.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        out = model.generate(input_ids=q["input_ids"], attention_mask=q["attention_mask"],
                             pixel_values=batch["pixel_values"], num_beams=3, max_length=10, min_length=1)
    assert out.shape[1] <= 10
    assert answers == [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]


def test_shipped_tiny_miss_keeps_its_pretraining_recipe():
    from raymed.models.miss import RAYMED_TINY
    from tests.conftest import make_rows

    ref = resolve("tiny-miss-med")
    proc = load_processor(ref)
    assert proc.miss_recipe == RAYMED_TINY
    enc = ref.family.encode(proc, make_rows(2), train=False, max_length=32)
    assert enc["input_ids"].shape[1] == 32 and (enc["input_ids"][:, 0] == proc.tokenizer.cls_token_id).all()
    assert enc["pixel_values"].max() > 0.5  # [0, 1], as it was pretrained; MISS's own recipe gives <= 1/255
    model = load_model(ref)
    assert not any(getattr(m, "_raymed_masks_pads", False) for m in model.modules())


def test_tokenizer_from_a_bert_directory_gets_dec_and_enc(converted, tmp_path):
    """--tokenizer-from: a bert-base-uncased-style vocab.txt; [DEC] and [ENC] are appended as BLIP's init_tokenizer
    does (30,522 + 2 for the real one), and the target config's special ids must agree with it."""
    _, _, _, ckpt = converted
    tiny = build_bert_tokenizer()
    words = [w for w, _ in sorted(tiny.get_vocab().items(), key=lambda kv: kv[1]) if w not in ("[DEC]", "[ENC]")]
    bert = tmp_path / "bert-base-uncased"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    out = tmp_path / "hf"
    mismatched = target_dir(tmp_path, "target-dec5")  # bos 5 = the tiny tokenizer's [DEC], not this vocab's
    assert convert_main(["--family", "miss", "--input", str(ckpt), "--config-from", str(mismatched),
                         "--tokenizer-from", str(bert), "--out", str(out)]) == 2
    assert not out.exists()
    target = target_dir(tmp_path, "target-bert", bos=len(words))
    assert convert_main(["--family", "miss", "--input", str(ckpt), "--config-from", str(target),
                         "--tokenizer-from", str(bert), "--out", str(out)]) == 0
    tok = load_processor(resolve(str(out))).tokenizer
    assert len(tok) == len(words) + 2 and tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(words), len(words) + 1]
