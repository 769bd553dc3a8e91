"""LLaVA family (LLaVA-Med v1.5 / v1.0 and any HF LLaVA directory): `LlavaForConditionalGeneration`.

Towers: vision (CLIP), projector (2-layer MLP), language (Mistral/LLaMA + `lm_head`).
LLaVA takes image features from vision layer `vision_feature_layer` (−2 for LLaVA-1.5) *before*
`post_layernorm`, so the encoder layers after it and `post_layernorm` are unused (docs/DESIGN.md §2.3).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    MistralConfig,
)

from raymed.data.conversations import conversation_turns
from raymed.pretrained import shipped_path
from raymed.models.base import Family, Preset
from raymed.models.templates import IMAGE, PLAIN_CHAT_TEMPLATE, resolve_template
from raymed.models.vocab import build_llava_tokenizer

IMAGE_ASPECTS = ("auto", "pad", "crop")
REPORT_INSTRUCTION = "describe the findings of this image."
# Shipped pretrained base (relative to the package), made by `python tools/pretrain.py --family llava`.
TINY_LLAVA_MED = "pretrained/tiny-llava-med"


def llava_config(vision: Mapping[str, Any], text: Mapping[str, Any], *, text_class: type = MistralConfig,
                 image_token_index: int | None = None) -> LlavaConfig:
    """A LLaVA-1.5-layout config at any size: image features from vision layer -2 (CLS dropped), a GELU
    projector, an untied LM head. `vision`: `CLIPVisionConfig` keys; `text`: keys of `text_class` (Mistral, or
    LLaMA for v1.0). Without `image_token_index` the model uses raymed's tokenizer (`models.vocab`): its size,
    `<image>`, pad, bos and eos ids (the tiny, pretrained and benchmark models)."""
    text = dict(text)
    if image_token_index is None:
        tok = build_llava_tokenizer()
        image_token_index = tok.convert_tokens_to_ids("<image>")
        text = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id, **text}
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=text_class(**{"tie_word_embeddings": False, **text}),
        image_token_index=image_token_index, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


# CLIP ViT-L/14 (LLaVA-Med's vision tower) at 336 px (v1.5) or 224 px (v1.0).
CLIP_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    patch_size=14, projection_dim=768)


def llava_med_v15() -> LlavaConfig:
    # As `python -m raymed.models.convert` writes it: 32000 tokens + <image> (32000) + <pad> (32001), padded to 32064.
    return llava_config({**CLIP_VIT_L14, "image_size": 336}, dict(
        vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, pad_token_id=32001,
    ), image_token_index=32000)


def llava_med_v10() -> LlavaConfig:
    # LLaVA-Med v1.0: LLaMA-7B + CLIP ViT-L/14 at 224 px. Its original projector is a single linear layer;
    # the HF LLaVA layout always has two, so projector counts differ from the original (LN counts do not).
    return llava_config({**CLIP_VIT_L14, "image_size": 224}, dict(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
    ), text_class=LlamaConfig, image_token_index=32000)


def tiny_llava_config() -> LlavaConfig:
    """A LLaVA-architecture model of ~0.5 M parameters: CLIP 32-d x 3 layers at 32 px, Mistral 64-d x 2."""
    return llava_config(
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
             patch_size=8, projection_dim=32),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256),
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
                   llava_med_v15, meta_only=True),
            Preset("llava-med-v1.0", "llava", "LLaVA-Med v1.0 (CLIP ViT-L/14-224 + LLaMA-7B), meta device",
                   llava_med_v10, meta_only=True),
            Preset("tiny-llava", "llava", "random-weight tiny LLaVA with a locally built processor (tests)",
                   tiny_llava_config),
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
    def new_processor(self, cfg: LlavaConfig) -> LlavaProcessor:
        """The tiny presets' processor: CLIP resize + centre crop (no pad) and the `plain` template, as pretrained."""
        size = cfg.vision_config.image_size
        image_processor = LlavaImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=False
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=build_llava_tokenizer(),
            patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            image_token="<image>",
            chat_template=PLAIN_CHAT_TEMPLATE,
        )

    def build_processor(self, preset: Preset) -> Any:
        processor = super().build_processor(preset)
        if preset.shipped_dir and not getattr(processor, "chat_template", None):
            # The shipped tiny base predates templates-as-data: it was pretrained with `plain` and centre crops.
            processor.chat_template = PLAIN_CHAT_TEMPLATE
            ip = processor.image_processor
            processor.image_processor = LlavaImageProcessorPil(
                size=dict(ip.size), crop_size=dict(ip.crop_size), image_mean=ip.image_mean, image_std=ip.image_std,
                resample=ip.resample, do_pad=False)
        return processor

    def load_processor(self, path: Any) -> LlavaProcessor:
        """An HF LLaVA directory's processor; fields it lacks (older conversions) come from the model config."""
        processor = super().load_processor(path)
        saved = {}
        proc_file = path / "processor_config.json"
        if proc_file.is_file():
            saved = json.loads(proc_file.read_text())
        cfg = LlavaConfig.from_pretrained(path)
        if processor.patch_size is None:
            processor.patch_size = cfg.vision_config.patch_size
        if processor.vision_feature_select_strategy is None:
            processor.vision_feature_select_strategy = cfg.vision_feature_select_strategy
        if "num_additional_image_tokens" not in saved and cfg.vision_config.model_type == "clip_vision_model":
            processor.num_additional_image_tokens = 1  # CLIP's CLS token
        return processor

    def convert_original(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LLaVA-Med `llava_mistral` / original LLaVA naming → HF `LlavaForConditionalGeneration` keys
        (`llava_convert.rename_state_dict`, the release converter's table)."""
        from raymed.models.llava_convert import rename_state_dict

        return rename_state_dict(state_dict)

    # ---- data ----------------------------------------------------------------------------------
    def num_image_tokens(self, processor: LlavaProcessor) -> int:
        crop = processor.image_processor.crop_size
        n = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
        n += processor.num_additional_image_tokens
        return n - 1 if processor.vision_feature_select_strategy == "default" else n

    def encode(
        self, processor: Any, rows: Mapping[str, Sequence[Any]], *, train: bool, max_length: int,
        template: str = "auto", image_aspect: str = "auto",
    ) -> dict[str, np.ndarray]:
        """See `Family.encode`. `template` / `image_aspect`: `model.template` / `data.image_aspect` (auto: the
        processor's chat template / its `do_pad`, LLaVA's pad-to-square unless the processor says otherwise).

        A conversation (a row whose `extra` holds a `history`) is rendered turn by turn with the template, its
        image in the first user turn; training puts the loss on every assistant turn, generation answers the last.
        A text-only row (image None) has no image tokens; its `pixel_values` row is a blank placeholder that
        `cut_padding` drops (`has_image` 0)."""
        tok = processor.tokenizer
        tpl = resolve_template(template, processor)
        image_block = [tok.convert_tokens_to_ids(processor.image_token)] * self.num_image_tokens(processor)
        images = list(rows["image"])
        has_image = np.asarray([im is not None for im in images], dtype=np.int64)
        blank = _blank_image(processor)
        pixel_values = self.pixel_values(processor, [im if im is not None else blank for im in images], image_aspect)
        batch = len(rows["question"])
        extras = list(rows["extra"]) if "extra" in rows else [None] * batch
        ids = np.full((batch, max_length), tok.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, max_length), dtype=np.int64)
        labels = np.full((batch, max_length), -100, dtype=np.int64)
        for i in range(batch):
            turns = conversation_turns(str(rows["question"][i]) or REPORT_INSTRUCTION, str(rows["answer"][i]),
                                       extras[i])
            seq, target, prompt_len = _encode_turns(tok, tpl, turns, image_block if has_image[i] else [], train)
            if prompt_len >= max_length:
                raise ValueError(
                    f"max_length={max_length} is too short for the prompt ({prompt_len} tokens incl. "
                    f"{len(image_block) if has_image[i] else 0} image tokens); raise data.max_length"
                )
            seq, target = seq[:max_length], target[:max_length]
            if train:
                ids[i, : len(seq)] = seq
                mask[i, : len(seq)] = 1
                labels[i, : len(seq)] = target
            else:  # left-pad prompts for batched generation
                ids[i, max_length - len(seq) :] = seq
                mask[i, max_length - len(seq) :] = 1
        out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values.astype(np.float32),
               "has_image": has_image}
        if train:
            out["labels"] = labels
        return out

    def cut_padding(self, processor: Any, batch: Mapping[str, Any], *, train: bool, multiple: int = 8) -> dict[str, Any]:
        """As `Family.cut_padding`, and the images of the batch's text-only rows dropped (`has_image`).

        A batch with no image at all gets one blank image whose tokens sit where nothing reads them (appended after
        row 0's end for training: causal attention, no label; prepended as masked left padding for generation): every
        rank then runs the vision tower on every step, as ZeRO-3's parameter gathering needs (a rank that skips it
        while another runs it waits forever), and the answers and loss are those of the text alone."""
        from raymed.data.padding import cut_columns

        out = cut_columns(batch, "attention_mask", ("input_ids", "labels"), multiple)
        if "has_image" not in out:
            return out
        keep = np.asarray(out.pop("has_image")).astype(bool)
        if keep.any():
            pixels = out["pixel_values"]
            out["pixel_values"] = pixels[torch.from_numpy(keep)] if isinstance(pixels, torch.Tensor) else pixels[keep]
            return out
        return _with_placeholder_image(out, processor, self.num_image_tokens(processor), train)

    @staticmethod
    def image_aspect(processor: Any, image_aspect: str = "auto") -> str:
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"unknown image_aspect {image_aspect!r}; known: {', '.join(IMAGE_ASPECTS)}")
        if image_aspect == "auto":
            do_pad = getattr(processor.image_processor, "do_pad", None)
            return "crop" if do_pad is False else "pad"
        return image_aspect

    def pixel_values(self, processor: Any, images: list[Image.Image], image_aspect: str = "auto") -> np.ndarray:
        """CLIP pixels; `pad` first pads each image to a square with the image mean colour (LLaVA's
        `expand2square`), so resize + centre crop keep the whole image; `crop` loses `1 - short/long` of it.
        As LLaVA-Med's `process_images`, a grayscale (`L`) image is padded with one grey, the mean of the mean
        colour (114 for CLIP), before it becomes RGB; a colour image with the mean colour (122, 116, 104)."""
        ip = processor.image_processor
        if self.image_aspect(processor, image_aspect) == "pad":
            images = [expand_to_square(im, pad_colour(im.mode, ip.image_mean)) for im in images]
        images = [im.convert("RGB") for im in images]
        kwargs = {"do_pad": False} if hasattr(ip, "do_pad") else {}
        return ip(images, return_tensors="np", **kwargs)["pixel_values"]

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
        # `###` ends an answer in LLaVA-Med v1.0's template; no answer of the other templates contains it.
        return [s.split("###")[0].strip() for s in tok.batch_decode(new, skip_special_tokens=True)]


def _encode_turns(tok: Any, tpl: Any, turns: list[tuple[str, str]], image_block: list[int],
                  train: bool) -> tuple[list[int], list[int], int]:
    """(token ids, labels, length of the last turn's prompt) of a conversation, the template applied turn by turn:
    training: every turn's prompt and answer, labels on the answers; generation: earlier turns, then the last
    prompt. `image_block` (the image tokens, or none for a text-only row) goes where the first turn says `<image>`."""
    seq = [tok.bos_token_id] if tpl.bos else []
    target = [-100] * len(seq)
    for k, (question, answer) in enumerate(turns):
        prompt_text, answer_text = tpl.render(question, answer, first=k == 0, image=bool(image_block))
        before, after = prompt_text.split(IMAGE) if IMAGE in prompt_text else ("", prompt_text)
        after_ids = tok(after, add_special_tokens=False)["input_ids"]
        prompt = (tok(before, add_special_tokens=False)["input_ids"] + image_block if IMAGE in prompt_text else []) \
            + after_ids
        if k == len(turns) - 1 and not train:
            return seq + prompt, target + [-100] * len(prompt), len(seq) + len(prompt)
        # The answer as the prompt's end and the answer tokenize together (as in the original training).
        joint = tok(after + answer_text, add_special_tokens=False)["input_ids"]
        reply = (joint[len(after_ids):] if joint[: len(after_ids)] == after_ids
                 else tok(answer_text, add_special_tokens=False)["input_ids"])
        reply += [tok.eos_token_id] if tpl.eos else []
        prompt_len = len(seq) + len(prompt)
        seq += prompt + reply
        target += [-100] * len(prompt) + reply
    return seq, target, prompt_len


def _blank_image(processor: Any) -> Image.Image:
    """The placeholder image of a text-only row (never seen by the model: `cut_padding` drops it)."""
    crop = processor.image_processor.crop_size
    return Image.new("RGB", (crop["width"], crop["height"]))


def _with_placeholder_image(batch: dict[str, Any], processor: Any, n_img: int, train: bool) -> dict[str, Any]:
    """A text-only batch with one blank image whose `n_img` tokens nothing reads (see `LlavaFamily.cut_padding`).
    Host arrays: numpy or torch, as the batch holds them."""
    tok = processor.tokenizer
    ids = batch["input_ids"]
    lib = torch if isinstance(ids, torch.Tensor) else np
    cat = (lambda a, b: torch.cat([a, b], dim=1)) if lib is torch else (lambda a, b: np.concatenate([a, b], axis=1))
    block = lib.full((ids.shape[0], n_img), tok.pad_token_id, dtype=lib.int64)
    block[0] = tok.convert_tokens_to_ids(processor.image_token)
    zeros, no_label = lib.zeros_like(block), lib.full_like(block, -100)
    out = dict(batch)
    out["pixel_values"] = batch["pixel_values"][:1]
    if train:  # after every row's end: causal attention, so no earlier token attends to it; no label
        out.update(input_ids=cat(ids, block), attention_mask=cat(batch["attention_mask"], zeros),
                   labels=cat(batch["labels"], no_label))
    else:  # masked left padding: generation's positions follow the mask
        out.update(input_ids=cat(block, ids), attention_mask=cat(zeros, batch["attention_mask"]))
    return out


def pad_colour(mode: str, mean: Sequence[float]) -> int | tuple[int, ...]:
    """LLaVA-Med's pad colour: `int(255 * mean(mean))` for grayscale, `int(255 * m)` per channel otherwise."""
    if mode == "L":
        return int(255 * sum(mean) / len(mean))
    return tuple(int(x * 255) for x in mean)


def expand_to_square(image: Image.Image, fill: int | tuple[int, ...]) -> Image.Image:
    """`image` centred on a square canvas of its long side, filled with `fill` (LLaVA's `expand2square`;
    LLaVA-Med's draws the offset from {centre, centre + 1} at random, raymed takes the centre: deterministic)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _config(model: nn.Module) -> LlavaConfig:
    cfg = getattr(model, "config", None)
    while cfg is not None and not isinstance(cfg, LlavaConfig):  # peft wrappers
        model = getattr(model, "base_model", None) or getattr(model, "model", None)
        cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError("not a LLaVA model")
    return cfg
