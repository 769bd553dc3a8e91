"""LLaVA family (LLaVA-Med v1.5 / v1.0 and any HF LLaVA directory): `LlavaForConditionalGeneration`.

Towers: vision (CLIP), projector (2-layer MLP), language (Mistral/LLaMA + `lm_head`).
LLaVA takes image features from vision layer `vision_feature_layer` (−2 for LLaVA-1.5) *before*
`post_layernorm`, so the encoder layers after it and `post_layernorm` are unused (docs/DESIGN.md §2.3).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
)

from ..pretrained import shipped_path
from .base import Family, Preset
from .vocab import build_llava_tokenizer

# The conversation template of the tiny presets (LLaVA "plain v1" style). The answer follows directly.
PROMPT = "USER: <image>\n{question} ASSISTANT:"
REPORT_INSTRUCTION = "describe the findings of this image."
# Shipped pretrained base (relative to the package), made by `python -m raymed.pretrain --family llava`.
TINY_LLAVA_MED = "pretrained/tiny-llava-med"


def _llava_med_v15() -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    text = MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


def _llava_med_v10() -> LlavaConfig:
    # LLaVA-Med v1.0: LLaMA-7B + CLIP ViT-L/14 at 224 px. Its original projector is a single linear layer;
    # the HF LLaVA layout always has two, so projector counts differ from the original (LN counts do not).
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


def tiny_llava_config(vocab_size: int, image_token_id: int, pad_token_id: int) -> LlavaConfig:
    """A LLaVA-architecture model of ~0.5 M parameters: CLIP 32-d x 3 layers at 32 px, Mistral 64-d x 2."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )
    text = MistralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=pad_token_id, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


class LlavaFamily(Family):
    model_class = LlavaForConditionalGeneration
    processor_class = LlavaProcessor

    def __init__(self) -> None:
        super().__init__(
            name="llava",
            model_types=("llava",),
            towers={
                "vision": ("model.vision_tower.",),
                "projector": ("model.multi_modal_projector.",),
                "language": ("model.language_model.", "lm_head."),
            },
            attn_modules=frozenset({"CLIPAttention", "MistralAttention", "LlamaAttention"}),
            ffn_modules=frozenset({"CLIPMLP", "MistralMLP", "LlamaMLP"}),
            embed_modules=frozenset({"CLIPVisionEmbeddings"}),
            head_prefixes=("lm_head.",),
            peft_task_type="CAUSAL_LM",
        )
        for p in (
            Preset("llava-med-v1.5", "llava", "LLaVA-Med v1.5 (CLIP ViT-L/14-336 + Mistral-7B), meta device",
                   _llava_med_v15, meta_only=True),
            Preset("llava-med-v1.0", "llava", "LLaVA-Med v1.0 (CLIP ViT-L/14-224 + LLaMA-7B), meta device",
                   _llava_med_v10, meta_only=True),
            Preset("tiny-llava", "llava", "random-weight tiny LLaVA with a locally built processor (tests)",
                   self._tiny_config),
            Preset("tiny-llava-med", "llava", "tiny LLaVA pretrained by raymed on synthetic scans (shipped weights)",
                   lambda: LlavaConfig.from_pretrained(shipped_path(TINY_LLAVA_MED)), shipped_dir=TINY_LLAVA_MED),
        ):
            self.presets[p.name] = p

    # ---- structure -----------------------------------------------------------------------------
    def unused_parameters(self, model: nn.Module) -> set[str]:
        cfg = _config(model)
        n_layers = cfg.vision_config.num_hidden_layers
        layer = cfg.vision_feature_layer
        first_used = min(layer) if isinstance(layer, Sequence) else layer
        # hidden_states[k] is the output of layer k-1 (hidden_states[0] = embeddings), so layers >= k are unused.
        k = first_used % (n_layers + 1)
        pat = re.compile(r"(?:^|\.)vision_tower\.(?:vision_model\.)?(?:encoder\.layers\.(\d+)\.|post_layernorm\.)")
        unused = set()
        for name, _ in model.named_parameters():
            m = pat.search(name)
            if m and (m.group(1) is None or int(m.group(1)) >= k):
                unused.add(name)
        return unused

    # ---- building and loading ------------------------------------------------------------------
    def _tiny_config(self) -> LlavaConfig:
        tok = build_llava_tokenizer()
        return tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)

    def new_processor(self, cfg: LlavaConfig) -> LlavaProcessor:
        size = cfg.vision_config.image_size
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=build_llava_tokenizer(),
            patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            image_token="<image>",
        )

    def convert_original(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LLaVA-Med `llava_mistral` / original LLaVA naming → HF `LlavaForConditionalGeneration` keys."""
        rules = [
            (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
            (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
            (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
            (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
            (r"^lm_head\.", "lm_head."),
        ]
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            for pat, rep in rules:
                new, n = re.subn(pat, rep, key)
                if n:
                    out[new] = value
                    break
            else:
                raise KeyError(f"llava converter: no rule for original key {key!r}")
        return out

    # ---- data ----------------------------------------------------------------------------------
    def num_image_tokens(self, processor: LlavaProcessor) -> int:
        crop = processor.image_processor.crop_size
        n = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
        n += processor.num_additional_image_tokens
        return n - 1 if processor.vision_feature_select_strategy == "default" else n

    def encode(
        self, processor: Any, rows: Mapping[str, Sequence[Any]], *, train: bool, max_length: int
    ) -> dict[str, np.ndarray]:
        tok = processor.tokenizer
        image_id = tok.convert_tokens_to_ids(processor.image_token)
        n_img = self.num_image_tokens(processor)
        pixel_values = processor.image_processor(list(rows["image"]), return_tensors="np")["pixel_values"]
        batch = len(rows["question"])
        ids = np.full((batch, max_length), tok.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, max_length), dtype=np.int64)
        labels = np.full((batch, max_length), -100, dtype=np.int64)
        for i in range(batch):
            question = str(rows["question"][i]) or REPORT_INSTRUCTION
            before, after = PROMPT.format(question=question).split("<image>")
            prompt = (
                [tok.bos_token_id]
                + tok(before, add_special_tokens=False)["input_ids"]
                + [image_id] * n_img
                + tok(after, add_special_tokens=False)["input_ids"]
            )
            answer = tok(" " + str(rows["answer"][i]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(prompt) >= max_length:
                raise ValueError(
                    f"max_length={max_length} is too short for the prompt ({len(prompt)} tokens incl. "
                    f"{n_img} image tokens); raise data.max_length"
                )
            seq = prompt + answer if train else prompt
            seq = seq[:max_length]
            if train:
                ids[i, : len(seq)] = seq
                mask[i, : len(seq)] = 1
                labels[i, len(prompt) : len(seq)] = seq[len(prompt) :]
            else:  # left-pad prompts for batched generation
                ids[i, max_length - len(seq) :] = seq
                mask[i, max_length - len(seq) :] = 1
        out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values.astype(np.float32)}
        if train:
            out["labels"] = labels
        return out

    def generate(
        self, model: nn.Module, processor: Any, batch: Mapping[str, torch.Tensor], max_new_tokens: int,
        **kwargs: Any,
    ) -> list[str]:
        tok = processor.tokenizer
        out = model.generate(**kwargs,
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"], max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        return [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]


def _config(model: nn.Module) -> LlavaConfig:
    cfg = getattr(model, "config", None)
    while cfg is not None and not isinstance(cfg, LlavaConfig):  # peft wrappers
        model = getattr(model, "base_model", None) or getattr(model, "model", None)
        cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError("not a LLaVA model")
    return cfg
