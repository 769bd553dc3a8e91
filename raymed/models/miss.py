"""MISS family (BLIP-VQA architecture): `BlipForQuestionAnswering`.

Towers: vision (ViT), text_encoder (BERT with cross-attention to image tokens), text_decoder (BERT decoder
cross-attending to the question encoding, with its LM head).

How a model reads its inputs and writes its answers is data, kept with its processor (`processor_config.json`,
key `miss_recipe`) and config, so each model keeps the recipe it was trained with:

- `MISS_ORIGINAL` (converted MISS checkpoints, `miss-base`, any directory without the key): as TIMMY-CHAN/MISS
  runs it (`train_rad.py`, `models/miss_vqa.py`, `data/*_dataset.py`; docs/DESIGN.md §7): images resized to
  480 x 480 bilinear, `ToTensor()` and divided by 255 once more (pixels in [0, 1/255], no mean/std; the image
  processor's `rescale_factor` is 1/255^2); questions truncated to 35 tokens with the first token replaced by
  `[ENC]` and padded to the longest in the batch; label smoothing 0.1 (`text_config.label_smoothing`); answers by
  beam search 3, max length 10, min length 1; the answer decoder does not attend to question pads.
  Not reproduced: the ViT's stochastic depth 0.1 in fine-tuning (transformers' BLIP has none), and the loss scale
  (MISS sums each answer's token losses and averages over questions, transformers averages over tokens: the same
  per-token weights, a constant factor AdamW does not see; miss-base.yaml turns gradient clipping off as MISS has).
- `RAYMED_TINY` (the tiny presets and the shipped `tiny-miss-med`, pretrained so): `[CLS]` first, questions padded
  to `data.max_length`, pixels in [0, 1], beam search 3 with max length `train.max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessorPil, BlipProcessor
from transformers.image_utils import PILImageResampling

from raymed.data.conversations import conversation_turns
from raymed.pretrained import shipped_path
from raymed.models.base import Family, Preset
from raymed.models.vocab import build_bert_tokenizer

NUM_BEAMS = 3
#: TIMMY-CHAN/MISS's recipe (see the module docstring); `None` lengths fall back to the run's config.
MISS_ORIGINAL: dict[str, Any] = {
    "name": "miss-original", "question_first_token": "[ENC]", "question_max_length": 35,
    "question_padding": "longest", "generate": {"num_beams": NUM_BEAMS, "max_length": 10, "min_length": 1},
    "decoder_masks_question_pads": True, "eval_batch_size": 100,
}
#: What raymed's tiny MISS models were built and pretrained with.
RAYMED_TINY: dict[str, Any] = {
    "name": "raymed-tiny", "question_first_token": None, "question_max_length": None,
    "question_padding": "max_length", "generate": {"num_beams": NUM_BEAMS, "max_length": None},
    "decoder_masks_question_pads": False,
}
MISS_IMAGE_SIZE = 480
MISS_RESCALE = 1 / 255 / 255  # ToTensor() (1/255) then the dataset's second /255
MISS_LABEL_SMOOTHING = 0.1
BLIP_VIT_LN_EPS = 1e-6  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6) (salesforce/BLIP models/vit.py)
# Shipped pretrained base (relative to the package), made by `python tools/pretrain.py --family miss`.
TINY_MISS_MED = "pretrained/tiny-miss-med"


def _miss_base() -> BlipConfig:
    return BlipConfig(
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=MISS_IMAGE_SIZE, patch_size=16, layer_norm_eps=BLIP_VIT_LN_EPS,
        ),
        text_config=dict(
            vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, encoder_hidden_size=768, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=30522, sep_token_id=102, label_smoothing=MISS_LABEL_SMOOTHING,
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


class MissProcessor(BlipProcessor):
    """A `BlipProcessor` that keeps the model's MISS recipe (saved in `processor_config.json`).

    `BlipProcessor.from_pretrained` still reads the directory (it ignores the extra key).
    """

    def __init__(self, image_processor: Any, tokenizer: Any, miss_recipe: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)
        self.miss_recipe = dict(miss_recipe) if miss_recipe is not None else dict(MISS_ORIGINAL)


def miss_image_processor(size: int = MISS_IMAGE_SIZE) -> BlipImageProcessorPil:
    """MISS's image transform: `Resize((size, size))` (PIL bilinear), `ToTensor()`, `/255` again."""
    return BlipImageProcessorPil(size={"height": size, "width": size}, resample=PILImageResampling.BILINEAR,
                                 rescale_factor=MISS_RESCALE, do_normalize=False, do_convert_rgb=True)


def recipe_of(processor: Any) -> dict[str, Any]:
    """The MISS recipe a processor carries (MISS's original one for a plain `BlipProcessor`)."""
    return getattr(processor, "miss_recipe", None) or MISS_ORIGINAL


def trim_questions(batch: Mapping[str, torch.Tensor], recipe: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Questions padded to the longest in the batch, as MISS tokenizes them (`padding='longest'`).

    The stream pads to a fixed width (Ray Data stacks batches); this cuts the all-padding columns. Training
    gives the same loss either way (pads are masked), but BLIP's `generate` lets the answer decoder attend to
    every question position, pads included, so answers depend on the padded width.
    """
    out = dict(batch)
    if recipe.get("question_padding") == "longest":
        width = int(batch["attention_mask"].sum(dim=1).max())
        out["input_ids"], out["attention_mask"] = batch["input_ids"][:, :width], batch["attention_mask"][:, :width]
    return out


def mask_question_pads(model: nn.Module) -> int:
    """Make the answer decoder's cross-attention honour the question mask, as BLIP's `models/med.py` does.

    transformers 5.23's `BlipTextAttention.forward` hands the encoder mask to `BlipTextSelfAttention` as
    `attention_mask`, which a cross-attention module then ignores (it reads `encoder_attention_mask`): the decoder
    attends to question pads in training. This pre-hook passes the mask on. Returns the modules hooked.
    """
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None:
            kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
        return args, kwargs

    n = 0
    for name, module in model.named_modules():
        if name.endswith("crossattention.self") and not getattr(module, "_raymed_masks_pads", False):
            module.register_forward_pre_hook(hook, with_kwargs=True)
            module._raymed_masks_pads = True
            n += 1
    return n


class MissFamily(Family):
    model_class = BlipForQuestionAnswering
    processor_class = MissProcessor

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

    def new_processor(self, cfg: BlipConfig, recipe: Mapping[str, Any] | None = None,
                      tokenizer: Any = None) -> MissProcessor:
        """A processor for `cfg`: MISS's original transform and recipe when `recipe` is `MISS_ORIGINAL`,
        raymed's tiny one (pixels in [0, 1], bicubic) otherwise; the tiny local tokenizer unless one is given."""
        size = cfg.vision_config.image_size
        recipe = dict(recipe or RAYMED_TINY)
        if recipe["name"] == MISS_ORIGINAL["name"]:
            image_processor = miss_image_processor(size)
        else:
            image_processor = BlipImageProcessorPil(
                size={"height": size, "width": size}, do_normalize=False, do_convert_rgb=True
            )
        return MissProcessor(image_processor=image_processor, tokenizer=tokenizer or build_bert_tokenizer(),
                             miss_recipe=recipe)

    def build(self, preset: Preset, device: str = "cpu", seed: int = 0) -> nn.Module:
        model = super().build(preset, device=device, seed=seed)
        if device != "meta" and self.build_processor(preset).miss_recipe.get("decoder_masks_question_pads"):
            mask_question_pads(model)
        return model

    def load_pretrained(self, path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
        model = super().load_pretrained(path, dtype=dtype)
        if self.load_processor(path).miss_recipe.get("decoder_masks_question_pads"):
            mask_question_pads(model)
        return model

    def build_processor(self, preset: Preset) -> MissProcessor:
        if preset.meta_only:  # the full-size architecture runs MISS's own recipe
            return self.new_processor(preset.build_config(), MISS_ORIGINAL)
        return super().build_processor(preset)

    def convert_original(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """BLIP/MISS original naming (`visual_encoder.*`, ...) → HF keys (`miss_convert.rename_original`)."""
        from raymed.models.miss_convert import rename_original

        return rename_original(state_dict).state_dict

    # ---- data ----------------------------------------------------------------------------------
    def encode(
        self, processor: Any, rows: Mapping[str, Sequence[Any]], *, train: bool, max_length: int,
        template: str = "auto", image_aspect: str = "auto",
    ) -> dict[str, np.ndarray]:
        # MISS has no conversation template and resizes to a square as its authors did: `template` and
        # `image_aspect` apply to LLaVA only (the config refuses other values for MISS).
        tok, recipe = processor.tokenizer, recipe_of(processor)
        _refuse_conversations(rows)
        images = [image.convert("RGB") for image in rows["image"]]  # MISS: `Image.open(...).convert('RGB')`
        pixel_values = processor.image_processor(images, return_tensors="np")["pixel_values"]
        questions = [str(q) or "describe the findings." for q in rows["question"]]
        q_len = recipe.get("question_max_length") or max_length
        q = tok(questions, padding="max_length", truncation=True, max_length=q_len, return_tensors="np")
        input_ids = q["input_ids"].astype(np.int64)
        if recipe.get("question_first_token"):  # MISS: `question.input_ids[:, 0] = tokenizer.enc_token_id`
            input_ids[:, 0] = tok.convert_tokens_to_ids(recipe["question_first_token"])
        out = {
            "pixel_values": pixel_values.astype(np.float32),
            "input_ids": input_ids,
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

    def cut_padding(self, processor: Any, batch: Mapping[str, Any], *, train: bool, multiple: int = 8) -> dict[str, Any]:
        """The answer decoder's columns (`decoder_*`, `labels`) cut to the longest answer: its self-attention is causal
        and the loss skips pads, so trailing pads change nothing. The question columns are cut only where the decoder
        masks question pads (`decoder_masks_question_pads`, MISS's recipe) and only in training: raymed's tiny MISS
        bases attend to them, and generation keeps the recipe's own question width (`trim_questions`)."""
        from raymed.data.padding import cut_columns

        out = cut_columns(batch, "decoder_attention_mask", ("decoder_input_ids", "labels"), multiple)
        if train and recipe_of(processor).get("decoder_masks_question_pads"):
            out = cut_columns(out, "attention_mask", ("input_ids",), multiple)
        return out

    def eval_batch_size(self, processor: Any) -> int | None:
        """MISS evaluates 100 questions at a time in file order (`train_rad.py`'s test loader), padded to the batch's
        longest, and BLIP's `generate` lets the answer decoder attend to that padding: answers depend on the batch."""
        return recipe_of(processor).get("eval_batch_size")

    def generate(
        self, model: nn.Module, processor: Any, batch: Mapping[str, torch.Tensor], max_new_tokens: int,
        **kwargs: Any,
    ) -> list[str]:
        recipe = recipe_of(processor)
        settings = dict(recipe["generate"])
        settings["max_length"] = settings.get("max_length") or max_new_tokens  # BLIP counts [DEC] in max_length
        q = trim_questions(batch, recipe)
        out = model.generate(**kwargs, **settings,
            input_ids=q["input_ids"], attention_mask=q["attention_mask"], pixel_values=batch["pixel_values"],
        )
        return [s.strip() for s in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]


def _refuse_conversations(rows: Mapping[str, Sequence[Any]]) -> None:
    """MISS (BLIP-VQA) answers one question about one image: a text-only or multi-turn row is an error naming it."""
    ids = list(rows["id"]) if "id" in rows else ["?"] * len(rows["image"])
    extras = list(rows["extra"]) if "extra" in rows else [None] * len(ids)
    for row_id, image, extra in zip(ids, rows["image"], extras):
        if image is None:
            raise ValueError(f"row {row_id!r} is text-only: MISS (BLIP-VQA) answers questions about an image; "
                             "train a LLaVA model on conversation data with text-only samples")
        if len(conversation_turns("", "", extra)) > 1:
            raise ValueError(f"row {row_id!r} is a multi-turn conversation: MISS (BLIP-VQA) takes one question per "
                             "image; train a LLaVA model on multi-turn data")
