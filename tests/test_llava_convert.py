"""LLaVA-Med v1.5 release (tiny, exact on-disk layout) -> HF LLaVA: equivalence with the original weights, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
)

from raymed.models.convert import main as convert_main
from raymed.models import ModelLoadError
from raymed.models.llava_convert import convert_llava_med
from tests.fixtures.llava_release import TEXT, VISION, VOCAB, write_llava_med_v15

# fp32 compute on identical bf16-stored weights: both sides round the same numbers; only summation order differs.
ATOL = 1e-5


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_llava_med_v15(tmp_path_factory.mktemp("orig") / "llava-med-v1.5-mistral-7b")


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "llava-med-v1.5-hf"
    assert convert_main(["--family", "llava", "--input", str(release), "--out", str(out)]) == 0
    return out


def original_state(release: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(release.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            state.update({k: fh.get_tensor(k) for k in fh.keys()})
    return state


def test_release_layout_is_the_originals(release):
    cfg = json.loads((release / "config.json").read_text())
    assert cfg["model_type"] == "llava_mistral" and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["mm_vision_select_layer"] == -2 and cfg["image_aspect_ratio"] == "pad"
    assert not (release / "tokenizer.json").exists() and (release / "tokenizer.model").is_file()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(release / "tokenizer.model"))
    assert sp.get_piece_size() == cfg["vocab_size"] == VOCAB
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"] and sp.pad_id() == -1
    index = json.loads((release / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.mm_projector.0.weight",
            "model.mm_projector.2.bias",
            "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"} <= set(index)
    assert len(set(index.values())) == 2


def test_converted_directory_loads_with_plain_transformers(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["image_token_index"] == VOCAB and cfg["pad_token_id"] == VOCAB + 1
    assert cfg["text_config"]["vocab_size"] == 384 and cfg["dtype"] == "bfloat16"  # 322 padded to a multiple of 64
    assert len(list(converted.glob("model-*.safetensors"))) == 2
    proc = AutoProcessor.from_pretrained(converted)
    tok = proc.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == VOCAB and tok.pad_token_id == VOCAB + 1
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert proc.patch_size == VISION["patch_size"] and proc.vision_feature_select_strategy == "default"
    assert proc.image_processor.do_pad and proc.chat_template
    model = LlavaForConditionalGeneration.from_pretrained(converted)
    assert model.dtype == torch.bfloat16


def test_language_logits_equal_mistral_built_from_original_keys(release, converted):
    orig = original_state(release)
    lm = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
                                          rope_theta=1e6, tie_word_embeddings=False, **TEXT))
    lm_state = {k: v.float() for k, v in orig.items() if k.startswith(("model.embed_tokens", "model.layers",
                                                                       "model.norm", "lm_head"))}
    lm.load_state_dict(lm_state, strict=True)
    hf = LlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 200, 5, 99, 310, 2, 44]])
    with torch.no_grad():
        want = lm.eval()(input_ids=ids).logits
        got = hf(input_ids=ids).logits
    assert got.shape[-1] == 384
    torch.testing.assert_close(got[..., :VOCAB], want, atol=ATOL, rtol=0)
    # the new rows (<image>, <pad>, padding) are the mean of the old ones
    emb = hf.get_input_embeddings().weight
    torch.testing.assert_close(emb[VOCAB:], orig["model.embed_tokens.weight"].float().mean(0).bfloat16().float()
                               .expand(384 - VOCAB, -1), atol=0, rtol=0)


def test_image_features_equal_the_hand_computed_path(release, converted):
    orig = original_state(release)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION))
    prefix = "model.vision_tower.vision_tower.vision_model."
    tower_state = {k.removeprefix(prefix): v.float() for k, v in orig.items() if k.startswith(prefix)}
    tower.load_state_dict(tower_state, strict=True)
    hf = LlavaForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    pixels = torch.randn(2, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = tower.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # drop CLS
        h = F.linear(hidden, orig["model.mm_projector.0.weight"].float(), orig["model.mm_projector.0.bias"].float())
        want = F.linear(F.gelu(h), orig["model.mm_projector.2.weight"].float(), orig["model.mm_projector.2.bias"].float())
        got = hf.get_image_features(pixel_values=pixels)
        got = got.pooler_output if hasattr(got, "pooler_output") else got
        got = torch.stack(list(got)) if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(got.reshape(want.shape), want, atol=ATOL, rtol=0)


# ---- bad input: each a clear error naming file and key; nothing left behind ---------------------------------
def _copy(release: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release, tmp_path / "release"))


def _fails(src: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "out" / "hf"
    with pytest.raises(ModelLoadError) as err:
        convert_llava_med(src, out)
    for n in needles:
        assert n in str(err.value), str(err.value)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "partial output left behind"


def test_another_model_type_is_refused(release, tmp_path):
    src = _copy(release, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    _fails(src, tmp_path, "config.json", "'qwen2'")


def test_llava_med_v10_is_refused_with_what_to_use(release, tmp_path):
    src = _copy(release, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg = {**cfg, "model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_use_im_start_end": True}
    cfg.pop("mm_projector_type")
    (src / "config.json").write_text(json.dumps(cfg))
    _fails(src, tmp_path, "v1.0", "delta weights", "llava-med-v1.5-mistral-7b")


def test_missing_shard_is_named(release, tmp_path):
    src = _copy(release, tmp_path)
    (src / "model-00002-of-00002.safetensors").unlink()
    _fails(src, tmp_path, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "model.")


def test_unknown_key_is_named_with_its_shard(release, tmp_path):
    src = _copy(release, tmp_path)
    shard = src / "model-00002-of-00002.safetensors"
    with safe_open(shard, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["model.vision_resampler.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    save_file(state, shard)
    _fails(src, tmp_path, "model-00002-of-00002.safetensors", "'model.vision_resampler.weight'")


def test_tokenizer_that_does_not_fit_the_embeddings_is_refused(release, tmp_path):
    from tests.fixtures.llava_release import train_sentencepiece

    src = _copy(release, tmp_path)
    (src / "tokenizer.model").write_bytes(train_sentencepiece(vocab_size=VOCAB + 20))
    _fails(src, tmp_path, "tokenizer.model", "model.embed_tokens.weight", str(VOCAB + 20))


def test_pickled_bin_shards_convert_to_the_same_weights(release, converted, tmp_path):
    """Older releases ship `pytorch_model-*.bin` shards (read with weights_only=True): same result."""
    src = _copy(release, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    renamed = {}
    for f in sorted(src.glob("model-*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            part = {k: fh.get_tensor(k) for k in fh.keys()}
        name = f.name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(part, src / name)
        renamed[f.name] = name
        f.unlink()
    (src / "model.safetensors.index.json").unlink()
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: renamed[v] for k, v in index["weight_map"].items()}}))
    out = convert_llava_med(src, tmp_path / "from-bin")["out"]
    for f in sorted(Path(converted).glob("model-*.safetensors")):
        with safe_open(f, framework="pt") as a, safe_open(Path(out) / f.name, framework="pt") as b:
            assert set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
