"""MISS family (BLIP-VQA architecture): `BlipForQuestionAnswering`.

Towers: vision (ViT), text_encoder (BERT with cross-attention to image tokens), text_decoder (BERT decoder
cross-attending to the question encoding, with its LM head). MISS preprocessing: resize, `ToTensor()`, no
mean/std normalisation. Answers are generated with beam search 3, max length 10 (docs/DESIGN.md §2.1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessorPil, BlipProcessor

from ..pretrained import shipped_path
from .base import Family, Preset
from .vocab import build_bert_tokenizer

NUM_BEAMS = 3
# Shipped pretrained base (relative to the package), made by `python -m raymed.pretrain --family miss`.
TINY_MISS_MED = "pretrained/tiny-miss-med"


def _miss_base() -> BlipConfig:
    return BlipConfig(
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=480, patch_size=16,
        ),
        text_config=dict(
            vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, encoder_hidden_size=768, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=30522, sep_token_id=102,
        ),
    )


def tiny_miss_config(vocab_size: int, pad_id: int, bos_id: int, sep_id: int) -> BlipConfig:
    """A BLIP-VQA-architecture model of ~0.3 M parameters: ViT 32-d x 2 at 32 px, BERT 32-d x 2 (x2)."""
    return BlipConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
            # BLIP's vision default (1e-10) is for loading pretrained weights; from scratch it leaves the
            # vision tower near-constant, with gradients ~1e-28 that no optimizer step can register.
            initializer_range=0.02,
        ),
        text_config=dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
            pad_token_id=pad_id, bos_token_id=bos_id, sep_token_id=sep_id,
        ),
    )


class MissFamily(Family):
    model_class = BlipForQuestionAnswering
    processor_class = BlipProcessor

    def __init__(self) -> None:
        super().__init__(
            name="miss",
            model_types=("blip",),
            towers={"vision": ("vision_model.",), "text_encoder": ("text_encoder.",), "text_decoder": ("text_decoder.",)},
            attn_modules=frozenset({"BlipAttention", "BlipTextAttention"}),
            ffn_modules=frozenset({"BlipMLP", "BlipTextIntermediate", "BlipTextOutput"}),
            embed_modules=frozenset({"BlipVisionEmbeddings", "BlipTextEmbeddings"}),
            head_prefixes=("text_decoder.cls.",),
            peft_task_type=None,  # prompt-learning methods wrap the text encoder (FEATURE_EXTRACTION)
        )
        for p in (
            Preset("miss-base", "miss", "MISS / BLIP-VQA base (ViT-B/16 at 480 px + BERT-base enc/dec), meta device",
                   _miss_base, meta_only=True),
            Preset("tiny-miss", "miss", "random-weight tiny MISS with a locally built processor (tests)",
                   self._tiny_config),
            Preset("tiny-miss-med", "miss", "tiny MISS pretrained by raymed on synthetic scans (shipped weights)",
                   lambda: BlipConfig.from_pretrained(shipped_path(TINY_MISS_MED)), shipped_dir=TINY_MISS_MED),
        ):
            self.presets[p.name] = p

    def _tiny_config(self) -> BlipConfig:
        tok = build_bert_tokenizer()
        return tiny_miss_config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.sep_token_id)

    def new_processor(self, cfg: BlipConfig) -> BlipProcessor:
        size = cfg.vision_config.image_size
        image_processor = BlipImageProcessorPil(
            size={"height": size, "width": size}, do_normalize=False, do_convert_rgb=True
        )
        return BlipProcessor(image_processor=image_processor, tokenizer=build_bert_tokenizer())

    def convert_original(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """BLIP/MISS original naming (`visual_encoder.*`, ...) → HF `BlipForQuestionAnswering` keys.

        Momentum copies (`*_m.*`) and queues used only in pretraining are dropped.
        """
        rules = [
            (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
            (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
            (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
            (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
            (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
            (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
            (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
            (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
            (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
            (r"^text_encoder\.(embeddings|encoder)\.", r"text_encoder.\1."),
            (r"^text_decoder\.(bert|cls)\.", r"text_decoder.\1."),
        ]
        dropped = re.compile(r"^(visual_encoder_m|text_encoder_m|text_decoder_m)\.|_queue$|^(temp|queue_ptr)$")
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if dropped.search(key) or key.startswith("text_encoder.pooler."):
                continue
            for pat, rep in rules:
                new, n = re.subn(pat, rep, key)
                if n:
                    out[new] = value
                    break
            else:
                raise KeyError(f"miss converter: no rule for original key {key!r}")
        return out

    # ---- data ----------------------------------------------------------------------------------
    def encode(
        self, processor: Any, rows: Mapping[str, Sequence[Any]], *, train: bool, max_length: int
    ) -> dict[str, np.ndarray]:
        tok = processor.tokenizer
        pixel_values = processor.image_processor(list(rows["image"]), return_tensors="np")["pixel_values"]
        questions = [str(q) or "describe the findings." for q in rows["question"]]
        q = tok(questions, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        out = {
            "pixel_values": pixel_values.astype(np.float32),
            "input_ids": q["input_ids"].astype(np.int64),
            "attention_mask": q["attention_mask"].astype(np.int64),
        }
        if train:
            # BLIP's decoder input is `[DEC] answer [SEP]`, padded with the pad id; the loss ignores pads.
            a = tok([str(x) for x in rows["answer"]], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="np")
            dec = a["input_ids"].astype(np.int64)
            dec[:, 0] = tok.bos_token_id
            labels = np.where(a["attention_mask"] == 1, dec, -100)
            out.update(decoder_input_ids=dec, decoder_attention_mask=a["attention_mask"].astype(np.int64),
                       labels=labels)
        return out

    def generate(
        self, model: nn.Module, processor: Any, batch: Mapping[str, torch.Tensor], max_new_tokens: int,
        **kwargs: Any,
    ) -> list[str]:
        out = model.generate(**kwargs,
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"], max_length=max_new_tokens, num_beams=NUM_BEAMS,
        )
        return [s.strip() for s in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
