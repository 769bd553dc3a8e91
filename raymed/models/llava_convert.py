"""Original LLaVA-Med v1.5 release (`llava_mistral`) → a transformers `LlavaForConditionalGeneration` directory.

    python -m raymed.models.convert --family llava --input llava-med-v1.5-mistral-7b/ --out models/llava-med-v1.5-hf

What it does, as transformers' own `convert_llava_weights_to_hf.py` does for LLaVA-1.5:
- text config from the original `config.json` (Mistral or LLaMA fields); vision config from the tower's name
  (`mm_vision_tower`, e.g. `openai/clip-vit-large-patch14-336`: the CLIP config is not in the release) or, for a
  tower it does not know, from the checkpoint's tensor shapes with OpenAI CLIP's head width 64 (`--vision-config`
  gives a CLIP `config.json` instead); either way checked against the shapes;
- `<image>` (id = vocab_size, 32000) and `<pad>` (32001) added to the tokenizer; the vocabulary padded to a multiple
  of 64 (32064) with new embedding / `lm_head` rows set to the mean of the old ones;
- weights streamed shard by shard in their own dtype (bf16 for the release: no fp32 copy), renamed, and written as
  sharded safetensors with an index; `torch_dtype` = that dtype;
- a processor: CLIP image processor with LLaVA's pad-to-square (`LlavaImageProcessorPil`, `do_pad`), the tokenizer,
  `patch_size`, `vision_feature_select_strategy`, `num_additional_image_tokens`, and the `mistral_instruct` chat
  template. Everything is written into a temporary directory that is moved to `--out` at the end.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raymed.models.base import ModelLoadError
from raymed.models.llava import CLIP_VIT_L14

PAD_TO_MULTIPLE = 64  # as transformers' LLaVA converter: 32000 + 2 new tokens -> 32064 rows
ORIGINAL_TYPES = {"llava_mistral": "mistral", "llava_llama": "llama"}
# Known towers (the CLIP config is not in the release, only its name). OpenAI CLIP ViT-L/14 at 336 and 224 px.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {**CLIP_VIT_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**CLIP_VIT_L14, "image_size": 224},
}
CLIP_HEAD_DIM = 64
# Original prefix -> HF LlavaForConditionalGeneration prefix.
RENAMES = [
    (re.compile(r"^model\.mm_projector\.0\."), "model.multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "model.multi_modal_projector.linear_2."),
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1."),
    (re.compile(r"^lm_head\."), "lm_head."),
]
# Buffers some original checkpoints carry that the HF model recomputes.
IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|\.position_ids)$")
# The `mistral_instruct` conversation of LLaVA-Med v1.5 (`llava/conversation.py`): `[INST] <image>\n{q} [/INST]`,
# answer ` {a}</s>`; BOS added by the tokenizer.
MISTRAL_INSTRUCT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)


def rename(key: str, source: str | Path = "checkpoint") -> str | None:
    """HF name of an original key (None: a buffer to drop); unknown keys are an error naming ``source`` (the file)."""
    if IGNORED.search(key):
        return None
    for pat, rep in RENAMES:
        new, n = pat.subn(rep, key)
        if n:
            return new
    raise ModelLoadError(f"{source}: key {key!r} is not part of a LLaVA-Med v1.5 checkpoint (no rule maps it to "
                         "the HF LLaVA layout)")


def rename_state_dict(state_dict: Mapping[str, torch.Tensor], source: str | Path = "checkpoint"
                      ) -> dict[str, torch.Tensor]:
    """A whole original state dict in HF names (`rename`; buffers the HF model recomputes dropped)."""
    return {new: value for key, value in state_dict.items() if (new := rename(key, source)) is not None}


def read_original_config(src: Path) -> dict[str, Any]:
    """The release's `config.json`, checked to be a LLaVA-Med v1.5 style (`llava_mistral`) model."""
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{src}: no config.json; --input must be the original release's directory")
    cfg = json.loads(cfg_file.read_text())
    model_type = cfg.get("model_type")
    if model_type == "llava" and "text_config" in cfg:
        raise ModelLoadError(f"{cfg_file}: already an HF LLaVA directory (model_type 'llava'): use it as it is")
    if cfg.get("mm_vision_tower") and (cfg.get("mm_projector_type", "linear") == "linear"
                                       or model_type not in ORIGINAL_TYPES):
        raise ModelLoadError(
            f"{cfg_file}: looks like LLaVA-Med v1.0 (model_type {model_type!r}, projector "
            f"{cfg.get('mm_projector_type', 'linear')!r}): its release holds delta weights to add to LLaMA-7B, a "
            "single-linear projector and no vision-tower weights, which this converter does not rebuild. Use "
            "LLaVA-Med v1.5 (microsoft/llava-med-v1.5-mistral-7b), or apply the v1.0 deltas with LLaVA-Med's own "
            "`llava.model.apply_delta` and convert that LLaVA-1.5-style result")
    if model_type not in ORIGINAL_TYPES:
        raise ModelLoadError(f"{cfg_file}: model_type {model_type!r} is not an original LLaVA-Med release; expected "
                             f"one of {sorted(ORIGINAL_TYPES)} (LLaVA-Med v1.5 is 'llava_mistral')")
    for key in ("mm_vision_tower", "mm_hidden_size", "hidden_size", "vocab_size"):
        if key not in cfg:
            raise ModelLoadError(f"{cfg_file}: missing key {key!r}")
    if cfg.get("mm_projector_type") != "mlp2x_gelu":
        raise ModelLoadError(f"{cfg_file}: mm_projector_type {cfg['mm_projector_type']!r} is not supported "
                             "(HF LLaVA has the 2-layer `mlp2x_gelu` projector)")
    if cfg.get("mm_use_im_start_end") or cfg.get("mm_vision_select_feature", "patch") != "patch":
        raise ModelLoadError(f"{cfg_file}: mm_use_im_start_end / mm_vision_select_feature other than false / "
                             "'patch' are not supported by HF LLaVA")
    return cfg


def shard_files(src: Path) -> list[Path]:
    """The checkpoint's shards, from its index when there is one; each must exist."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (src / f).is_file():
                    key = next(k for k, v in weight_map.items() if v == f)
                    raise ModelLoadError(f"{index}: shard {f!r} (holding e.g. {key!r}) is missing from {src}")
            return [src / f for f in files]
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"{src}: no *.safetensors or pytorch_model*.bin weights")
    return files


def iter_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one shard, read safely (safetensors, or torch.load with weights_only and mmap)."""
    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def shard_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor without reading the weights (safetensors headers)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            shapes.update({k: tuple(v.shape) for k, v in iter_shard(file)})
    return shapes


def vision_config(cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]], vision_config_file: Path | None) -> Any:
    """CLIP vision config: from --vision-config, the known tower table, or the tensor shapes; checked vs shapes."""
    from transformers import CLIPVisionConfig

    p = "model.vision_tower.vision_tower.vision_model."
    if p + "embeddings.patch_embedding.weight" not in shapes:
        raise ModelLoadError(f"checkpoint has no vision tower ({p}embeddings.patch_embedding.weight missing): "
                             "LLaVA-Med v1.5 ships the CLIP tower inside its shards")
    hidden, _, patch, _ = shapes[p + "embeddings.patch_embedding.weight"]
    n_pos = shapes[p + "embeddings.position_embedding.weight"][0]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", k)))
    derived = dict(hidden_size=hidden, patch_size=patch, image_size=patch * math.isqrt(n_pos - 1),
                   num_hidden_layers=layers, intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0])
    if vision_config_file is not None:
        data = json.loads(Path(vision_config_file).read_text())
        vc = CLIPVisionConfig(**data.get("vision_config", data))
    elif cfg["mm_vision_tower"] in KNOWN_TOWERS:
        vc = CLIPVisionConfig(**KNOWN_TOWERS[cfg["mm_vision_tower"]])
    else:
        vc = CLIPVisionConfig(**derived, num_attention_heads=max(hidden // CLIP_HEAD_DIM, 1))
    wrong = {k: (getattr(vc, k), v) for k, v in derived.items() if getattr(vc, k) != v}
    if wrong:
        raise ModelLoadError(f"vision tower {cfg['mm_vision_tower']!r}: config disagrees with the checkpoint's "
                             f"shapes (config, checkpoint): {wrong}")
    if cfg["mm_hidden_size"] != hidden:
        raise ModelLoadError(f"config.json: mm_hidden_size {cfg['mm_hidden_size']} but the vision tower is {hidden}-d")
    return vc


def hf_config(cfg: dict[str, Any], vision: Any, vocab: int, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlavaConfig, MistralConfig

    text_cls = MistralConfig if ORIGINAL_TYPES[cfg["model_type"]] == "mistral" else LlamaConfig
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "rope_theta", "sliding_window", "hidden_act",
              "bos_token_id", "eos_token_id", "attention_dropout", "initializer_range")
    text = text_cls(**{k: cfg[k] for k in fields if k in cfg}, vocab_size=vocab, pad_token_id=cfg["vocab_size"] + 1,
                    tie_word_embeddings=False)
    out = LlavaConfig(vision_config=vision, text_config=text, image_token_index=cfg["vocab_size"],
                      projector_hidden_act="gelu", vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
                      vision_feature_select_strategy="default", tie_word_embeddings=False,
                      image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    out.pad_token_id = cfg["vocab_size"] + 1
    out.dtype = dtype  # saved as `torch_dtype` / `dtype`
    return out


def build_processor(src: Path, vision: Any, cfg: dict[str, Any]) -> Any:
    """Tokenizer + `<image>` / `<pad>`, LLaVA's pad-to-square CLIP image processor, chat template."""
    import transformers
    from transformers import AutoTokenizer, LlavaImageProcessorPil, LlavaProcessor

    if not (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file():
        raise ModelLoadError(f"{src}: no tokenizer.model (sentencepiece) or tokenizer.json")
    # The class the release names (LlamaTokenizer: reads the sentencepiece tokenizer.model); no remote code.
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    tok_cls = getattr(transformers, str(tok_cfg.get("tokenizer_class", "")).removesuffix("Fast"), AutoTokenizer)
    tok = tok_cls.from_pretrained(src)
    if len(tok) != cfg["vocab_size"]:
        raise ModelLoadError(f"{src / 'tokenizer.model'}: {len(tok)} tokens but config.json vocab_size is "
                             f"{cfg['vocab_size']} (model.embed_tokens.weight rows): tokenizer and weights disagree")
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    if tok.convert_tokens_to_ids("<image>") != cfg["vocab_size"] or tok.pad_token_id != cfg["vocab_size"] + 1:
        raise ModelLoadError(f"{src}: tokenizer already holds <image>/<pad> at other ids")
    size = vision.image_size
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                             do_pad=cfg.get("image_aspect_ratio") == "pad")
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vision.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>", chat_template=MISTRAL_INSTRUCT_CHAT_TEMPLATE)


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Embedding / lm_head padded to `rows` with the mean of the existing rows (computed in fp32)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0).contiguous()


def convert_llava_med(src: Path, out: Path, vision_config_file: Path | None = None) -> dict[str, Any]:
    """Convert the original release in `src` into an HF directory `out` (must not exist). Returns a summary."""
    from transformers import LlavaForConditionalGeneration

    src, out = Path(src), Path(out)
    if out.exists():
        raise ModelLoadError(f"--out {out} already exists; choose a new directory")
    cfg = read_original_config(src)
    files = shard_files(src)
    shapes = shard_shapes(files)
    vocab = cfg["vocab_size"]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key not in shapes:
            raise ModelLoadError(f"{src}: checkpoint has no {key!r}")
        if shapes[key][0] != vocab:
            raise ModelLoadError(f"{src}: {key} has {shapes[key][0]} rows but config.json vocab_size is {vocab}")
    vision = vision_config(cfg, shapes, vision_config_file)
    new_vocab = math.ceil((vocab + 2) / PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    dtypes: set[torch.dtype] = set()

    with torch.device("meta"):
        expected = LlavaForConditionalGeneration(hf_config(cfg, vision, new_vocab, torch.float32)).state_dict()
    expected_shapes = {k: tuple(v.shape) for k, v in expected.items()}
    processor = build_processor(src, vision, cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for i, file in enumerate(files):
            name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            part: dict[str, torch.Tensor] = {}
            for key, tensor in iter_shard(file):
                new = rename(key, file)
                if new is None:
                    continue
                if new not in expected_shapes:
                    raise ModelLoadError(f"{file}: key {key!r} (-> {new!r}) is not in the HF LLaVA architecture")
                if new in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                    tensor = pad_rows(tensor, new_vocab)
                if tuple(tensor.shape) != expected_shapes[new]:
                    raise ModelLoadError(f"{file}: key {key!r} has shape {tuple(tensor.shape)}, expected "
                                         f"{expected_shapes[new]}")
                part[new] = tensor.contiguous()
                dtypes.add(tensor.dtype)
            save_file(part, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
            total += sum(t.numel() * t.element_size() for t in part.values())
            del part
        missing = sorted(set(expected_shapes) - set(weight_map))
        if missing:
            raise ModelLoadError(f"{src}: checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:5]}")
        if len(dtypes) != 1:
            raise ModelLoadError(f"{src}: mixed dtypes in the checkpoint {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        hf_config(cfg, vision, new_vocab, dtype).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "raymed_conversion.json").write_text(json.dumps({
            "source": str(src.resolve()), "source_model_type": cfg["model_type"], "vision_tower": cfg["mm_vision_tower"],
            "image_token_index": vocab, "pad_token_id": vocab + 1, "vocab_size": new_vocab, "dtype": str(dtype),
            "template": "llava-med-v1.5", "image_aspect": "pad" if cfg.get("image_aspect_ratio") == "pad" else "crop",
        }, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "vocab_size": new_vocab, "dtype": str(dtype), "shards": len(files)}
