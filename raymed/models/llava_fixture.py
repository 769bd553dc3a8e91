"""A tiny stand-in for `microsoft/llava-med-v1.5-mistral-7b`, written in the release's exact on-disk layout.

Used by the tests, the README walk-through and `python -m raymed.bench gpu`: nothing is downloaded. The directory
holds what the release holds (LLaVA-Med's `llava_mistral` `config.json` with its `mm_*` keys, sharded
`model-0000i-of-0000n.safetensors` with the original key names and `model.safetensors.index.json`, a sentencepiece
`tokenizer.model` with `<unk>`=0, `<s>`=1, `</s>`=2 and no pad, `tokenizer_config.json`,
`special_tokens_map.json`, `generation_config.json`), only with tiny sizes. The weights are built the way the
original model holds them: a `MistralForCausalLM` (`model.*`, `lm_head`), a CLIP vision model under
`model.vision_tower.vision_tower.`, and the `mlp2x_gelu` projector `model.mm_projector.{0,2}`.

    python -m raymed.models.llava_fixture DIR     # writes the fixture into DIR
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

from .vocab import WORDS

# Tiny sizes. The vision tower keeps OpenAI CLIP's head width (64), so its head count follows from its shapes.
VOCAB = 320  # sentencepiece BPE with byte fallback: 3 specials + 256 bytes + 61 merges
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1, image_size=28,
              patch_size=14)
TOWER_NAME = "raymed/tiny-clip-vit-14-28"  # not a known tower: the converter derives its config from the shapes


def original_config() -> dict:
    """`config.json` as LLaVA-Med v1.5 ships it (same keys; tiny sizes)."""
    return {
        "_name_or_path": "llava-med-v1.5-mistral-7b",
        "architectures": ["LlavaMistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": TEXT["hidden_size"],
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": TEXT["intermediate_size"],
        "max_position_embeddings": 256,
        "mm_hidden_size": VISION["hidden_size"],
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": TOWER_NAME,
        "model_type": "llava_mistral",
        "num_attention_heads": TEXT["num_attention_heads"],
        "num_hidden_layers": TEXT["num_hidden_layers"],
        "num_key_value_heads": TEXT["num_key_value_heads"],
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vocab_size": VOCAB,
    }


def train_sentencepiece(vocab_size: int = VOCAB, seed: int = 0) -> bytes:
    """A sentencepiece BPE model trained like Mistral's: byte fallback, `<unk>`=0, `<s>`=1, `</s>`=2, no pad piece."""
    import sentencepiece as spm

    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=True,
        # LLaMA / Mistral trainer settings: no text normalisation, whitespace kept, a dummy prefix space.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, minloglevel=2,
    )
    return buf.getvalue()


def original_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The original model's state dict (original key names), random, in bf16."""
    torch.manual_seed(seed)
    lm = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
                                          **TEXT))
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION))
    projector = nn.Sequential(nn.Linear(VISION["hidden_size"], TEXT["hidden_size"]), nn.GELU(),
                              nn.Linear(TEXT["hidden_size"], TEXT["hidden_size"]))
    state = dict(lm.state_dict())
    # transformers 4.36 (the release's) nests the CLIP tower as `vision_model.*`; transformers 5 drops that level.
    state.update({f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v
                  for k, v in tower.state_dict().items()})
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items() if not k.endswith("position_ids")}


def write_llava_med_v15(out: Path | str, seed: int = 0, shards: int = 2) -> Path:
    """Write the tiny LLaVA-Med v1.5 release into `out` (created) and return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = original_weights(seed)
    keys = list(state)  # language model first, then vision tower and projector, as the release's shards run
    per = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(original_config(), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.2"}, indent=2))
    (out / "tokenizer.model").write_bytes(train_sentencepiece(seed=seed))
    special = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
               "special": True}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {**special, "content": t} for i, t in enumerate(["<unk>", "<s>", "</s>"])},
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
         for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}, indent=2))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m raymed.models.llava_fixture DIR")
    print(write_llava_med_v15(sys.argv[1]))
