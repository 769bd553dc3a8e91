"""Templates as data, pad-vs-crop preprocessing, and HF LLaVA directories used as they are."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from raymed.config import ConfigError, load_config
from raymed.models import load_processor, resolve
from raymed.models.llava_convert import convert_llava_med
from raymed.models.templates import TEMPLATES, V10_SYSTEM
from tests.conftest import make_rows
from tests.fixtures.llava_release import VOCAB, write_llava_med_v15


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpl")
    return convert_llava_med(write_llava_med_v15(root / "orig"), root / "hf")["out"], root / "orig"


def _rows(question: str, answer: str) -> dict:
    return {"image": [Image.new("RGB", (40, 30), (90, 90, 90))], "question": [question], "answer": [answer],
            "task": ["vqa"], "answer_type": ["closed"]}


def _seq(enc: dict, key: str = "input_ids") -> list[int]:
    mask = enc["attention_mask"][0].astype(bool)
    return enc[key][0][mask].tolist()


def test_llava_med_v15_prompt_and_labels_match_the_original_tokenization(converted):
    """LLaVA's `tokenizer_image_token` on `[INST] <image>\\n{q} [/INST]` (each chunk through sentencepiece, one
    BOS), with labels = the answer tokens of the whole conversation `... [/INST] {a}` + `</s>`, read with the
    sentencepiece library itself."""
    out, orig = converted
    ref = resolve(out)
    proc = load_processor(ref)
    n_img = ref.family.num_image_tokens(proc)
    assert n_img == 4  # (28 / 14)^2 patches, CLS dropped
    sp = spm.SentencePieceProcessor(model_file=str(orig / "tokenizer.model"))
    q, a = "is there a lesion in the liver?", "yes"
    prompt = [1] + sp.encode("[INST] ") + [VOCAB] * n_img + sp.encode("\n" + q + " [/INST]")
    whole = sp.encode("\n" + q + " [/INST] " + a)
    answer = whole[len(sp.encode("\n" + q + " [/INST]")):] + [2]
    for template in ("auto", "llava-med-v1.5"):  # the converted directory's chat template is v1.5's
        train = ref.family.encode(proc, _rows(q, a), train=True, max_length=64, template=template)
        gen = ref.family.encode(proc, _rows(q, a), train=False, max_length=64, template=template)
        assert _seq(train) == prompt + answer
        labels = train["labels"][0]
        assert labels[labels != -100].tolist() == answer  # the answer and its end token only
        assert _seq(gen) == prompt and gen["input_ids"][0][-len(prompt):].tolist() == prompt  # left-padded
    assert sp.decode(answer[:-1]) == a and sp.decode(prompt[-len(sp.encode("\n" + q + " [/INST]")):]).endswith("[/INST]")


def test_plain_and_v10_templates_give_their_exact_sequences():
    ref = resolve("tiny-llava")
    proc = load_processor(ref)
    tok, n_img = proc.tokenizer, ref.family.num_image_tokens(proc)
    q, a = "which organ is shown?", "left kidney"
    image = tok.convert_tokens_to_ids("<image>")

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    want_plain = [tok.bos_token_id] + ids("USER: ") + [image] * n_img + ids(f"\n{q} ASSISTANT:")
    for template in ("auto", "plain"):  # the tiny presets carry `plain` as their chat template
        enc = ref.family.encode(proc, _rows(q, a), train=True, max_length=96, template=template)
        assert _seq(enc) == want_plain + ids(" " + a) + [tok.eos_token_id]
    enc = ref.family.encode(proc, _rows(q, a), train=True, max_length=512, template="llava-med-v1.0")
    head = ids(V10_SYSTEM + "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n###Human: ")
    tail = ids(f"\n{q}###Assistant:")
    assert _seq(enc) == [tok.bos_token_id] + head + [image] * n_img + tail + ids(f" {a}###")  # v1.0: no </s>
    labels = enc["labels"][0]
    assert tok.decode(labels[labels != -100].tolist()) == tok.decode(ids(f" {a}###"))
    assert TEMPLATES["llava-med-v1.0"].stop == "###"


def test_template_config_key_is_validated():
    assert load_config(overrides=["model.template=llava-med-v1.5"]).model.template == "llava-med-v1.5"
    with pytest.raises(ConfigError, match="model.template"):
        load_config(overrides=["model.template=vicuna"])
    with pytest.raises(ConfigError, match="applies to LLaVA models only"):
        load_config(overrides=["model.name=tiny-miss", "model.template=plain"])


def _band_image(wide: bool) -> Image.Image:
    """128 x 32 (or 32 x 128): red first quarter, blue last quarter, green middle, along the long axis."""
    arr = np.zeros((32, 128, 3), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:96] = (0, 255, 0)
    arr[:, 96:] = (0, 0, 255)
    return Image.fromarray(arr if wide else arr.transpose(1, 0, 2).copy())


@pytest.mark.parametrize("wide", [True, False])
def test_pad_keeps_the_borders_of_wide_and_tall_images_and_crop_loses_them(wide):
    ref = resolve("tiny-llava")
    proc = load_processor(ref)
    assert ref.family.image_aspect(proc) == "crop"  # the tiny presets keep what they were pretrained with
    mean, std = np.array(proc.image_processor.image_mean), np.array(proc.image_processor.image_std)

    def colour(pix: np.ndarray, along: int) -> np.ndarray:  # RGB (0-255) at the middle of the short axis
        v = pix[:, 16, along] if wide else pix[:, along, 16]
        return (v * std + mean) * 255

    for aspect in ("pad", "crop"):
        pix = ref.family.pixel_values(proc, [_band_image(wide)], aspect)[0]
        size = pix.shape[-1]
        first, last = colour(pix, 1), colour(pix, size - 2)
        if aspect == "pad":
            assert first[0] > 200 and first[1] < 60 and last[2] > 200 and last[1] < 60, (first, last)
            # the padding is the image-mean colour
            pad = (pix[:, 1, 16] if wide else pix[:, 16, 1]) * std + mean
            np.testing.assert_allclose(pad * 255, [int(x * 255) for x in mean], atol=2)
        else:
            assert first[1] > 200 and last[1] > 200, (first, last)  # only the green middle survives a centre crop
    # the converted LLaVA-Med directory pads by default
    assert load_config(overrides=["data.image_aspect=pad"]).data.image_aspect == "pad"


def test_grayscale_scans_are_padded_with_one_grey_before_they_become_rgb():
    """LLaVA-Med's `process_images` (llava/mm_utils.py): an `L` image is padded with `int(255 * mean(image_mean))`
    (114 for CLIP) before the processor turns it into RGB; a colour image with the per-channel mean colour. The
    image goes through the data path's decode (PNG bytes -> `L` kept) as a row would."""
    import io

    from raymed.data.images import decode_image

    ref = resolve("tiny-llava")
    proc = load_processor(ref)
    mean, std = np.array(proc.image_processor.image_mean), np.array(proc.image_processor.image_std)
    buffer = io.BytesIO()
    Image.new("L", (64, 16), 0).save(buffer, format="PNG")  # a wide black grayscale scan
    gray = decode_image(buffer.getvalue(), mode="keep-gray")
    assert gray.mode == "L" and decode_image(buffer.getvalue()).mode == "RGB"
    pix = ref.family.pixel_values(proc, [gray], "pad")[0]
    grey = int(255 * mean.sum() / 3)
    assert grey == 114
    np.testing.assert_allclose(pix[:, 1, 16] * std + mean, [grey / 255] * 3, atol=1e-3)  # the pad: one grey
    np.testing.assert_allclose(pix[:, 16, 16] * std + mean, [0, 0, 0], atol=1e-3)  # the scan itself
    colour = ref.family.pixel_values(proc, [gray.convert("RGB")], "pad")[0]  # converted first: tinted pad
    np.testing.assert_allclose(colour[:, 1, 16] * std + mean, [int(x * 255) / 255 for x in mean], atol=1e-3)


def test_hf_directory_without_patch_size_in_its_processor_uses_the_model_config(converted, tmp_path):
    out, _ = converted
    d = shutil.copytree(out, tmp_path / "community-hf")
    pc = json.loads((d / "processor_config.json").read_text())
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        pc.pop(key, None)
    (d / "processor_config.json").write_text(json.dumps(pc))
    ref = resolve(str(d))
    proc = load_processor(ref)
    assert proc.patch_size == 14 and proc.vision_feature_select_strategy == "default"
    assert proc.num_additional_image_tokens == 1
    enc = ref.family.encode(proc, make_rows(2), train=True, max_length=64)
    assert (enc["input_ids"] == VOCAB).sum(axis=1).tolist() == [4, 4]
    assert ref.family.image_aspect(proc) == "pad"
