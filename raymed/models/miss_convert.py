"""Original MISS / BLIP checkpoints → a transformers `BlipForQuestionAnswering` model directory.

MISS (TIMMY-CHAN/MISS) and BLIP (salesforce/BLIP) save `torch.save({'model': state_dict, 'config': config})`,
or a bare state dict, in BLIP's module names (`visual_encoder.*`, `text_encoder.*`, `text_decoder.*`,
salesforce/BLIP `models/blip_vqa.py`). Converting them (docs/DESIGN.md §7):

- Reading is safe: `torch.load(weights_only=True)` first. MISS pickles its `config` as a ruamel round-trip YAML
  object, which that refuses; the file is then read with a restricted unpickler that builds only what
  `weights_only` allows (tensors, plain containers) and turns every other object into an inert placeholder
  that is never called, so no code from the file runs. Those entries are reported as not read.
- Key names follow transformers' `convert_blip_original_pytorch_to_hf.py::rename_key`; the text towers already
  share BLIP's names. `position_ids` buffers (non-persistent in transformers) are dropped; pretraining-only
  parts (`vision_proj`, `text_proj`, `itm_head`, momentum copies `*_m`, queues, `temp`) are dropped and listed.
- A `pos_embed` saved at another image size (224 px pretraining vs 480 px fine-tuning) is interpolated as
  BLIP's `models/vit.py::interpolate_pos_embed` does (bicubic, class token kept).
- The vocabulary (bert-base-uncased + `[DEC]` + `[ENC]` = 30,524 for MISS) must match the embeddings.
- The output gets MISS's own recipe (`miss.MISS_ORIGINAL`: image transform, `[ENC]`, decoding), label smoothing
  0.1 and BLIP's ViT LayerNorm eps 1e-6, and is written to a temporary directory moved into place at the end.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import types
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from raymed.models.base import ModelLoadError

# Pretraining-only parts of BLIP/MISS checkpoints (models/blip_pretrain.py, MISS models/miss_pretrain.py).
PRETRAINING_ONLY = re.compile(
    r"^(visual_encoder_m|text_encoder_m|text_decoder_m|vision_proj_m|text_proj_m|vision_proj|text_proj|itm_head)\."
    r"|^(image_queue|text_queue|idx_queue|ptr_queue|queue_ptr|temp)$|^text_encoder\.pooler\."
)
BUFFERS = re.compile(r"(^|\.)position_ids$")
RENAMES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision_model.embeddings.patch_embedding.\1"),
    (r"^visual_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)$", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"vision_model.encoder.layers.\1.self_attn.qkv.\2"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$",
     r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"^visual_encoder\.norm\.(weight|bias)$", r"vision_model.post_layernorm.\1"),
    (r"^text_encoder\.(embeddings|encoder)\.", r"text_encoder.\1."),
    (r"^text_decoder\.(bert|cls)\.", r"text_decoder.\1."),
]
POS_EMBED = "vision_model.embeddings.position_embedding"
WORD_EMBEDDINGS = ("text_encoder.embeddings.word_embeddings.weight", "text_decoder.bert.embeddings.word_embeddings.weight")
# transformers ties these to the decoder's word embeddings / prediction bias (BLIP ties them too).
TIED = {"text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias"}
MISS_VOCAB = 30524  # bert-base-uncased (30,522) + [DEC] + [ENC]


# ---- reading ------------------------------------------------------------------------------------
class _Opaque:
    """Stands for an object the restricted unpickler does not build: it takes any arguments and state, keeps none."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Opaque":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _restricted_pickle_module(skipped: list[str]) -> types.SimpleNamespace:
    """A `pickle_module` for `torch.load`: globals outside torch's `weights_only` allowlist become `_Opaque`."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = _get_allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            qualname = f"{module}.{name}"
            if qualname in allowed:
                return allowed[qualname]
            skipped.append(qualname)
            return type(name, (_Opaque,), {"qualname": qualname})

    return types.SimpleNamespace(Unpickler=Unpickler, load=lambda f, **kw: Unpickler(f, **kw).load(),
                                 __name__="raymed_restricted_pickle")


def _load_file(path: Path, notes: list[str]) -> Any:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelLoadError(f"{path}: not a readable safetensors file ({e}); is it truncated?") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_error = e
    except Exception as e:  # noqa: BLE001 - zip / EOF errors of a truncated or corrupt file
        raise ModelLoadError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); "
                             "is the file truncated or corrupt?") from e
    skipped: list[str] = []
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(skipped))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot read the checkpoint, even keeping tensors and plain containers only "
                             f"({type(e).__name__}: {e}); weights_only loading said: {first_error}") from e
    names = ", ".join(sorted(set(skipped)))
    notes.append(f"{path.name}: weights_only loading refused non-tensor objects; read with the restricted "
                 f"unpickler, objects not built: {names}")
    return obj


def read_original(path: Path | str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of an original checkpoint (file, or directory of shards) and notes on what was not read."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted([*path.glob("*.pth"), *path.glob("*.bin")])
        if not files:
            raise ModelLoadError(f"{path}: no .safetensors, .pth or .bin files")
    elif path.is_file():
        files = [path]
    else:
        raise ModelLoadError(f"{path}: no such checkpoint file or directory")
    notes: list[str] = []
    state: dict[str, torch.Tensor] = {}
    for f in files:
        obj = _load_file(f, notes)
        if isinstance(obj, Mapping) and ("model" in obj or "state_dict" in obj):
            inner = "model" if "model" in obj else "state_dict"
            others = [str(k) for k in obj if k != inner]
            if others:
                notes.append(f"{f.name}: entries other than {inner!r} not used: {', '.join(others)}")
            obj = obj[inner]
        if not isinstance(obj, Mapping):
            raise ModelLoadError(f"{f}: expected a state dict or {{'model': state_dict, ...}}, got {type(obj).__name__}")
        for key, value in obj.items():
            if not isinstance(value, torch.Tensor):
                raise ModelLoadError(f"{f}: key {key!r} holds a {type(value).__name__}, not a tensor")
            state[str(key)] = value
    return state, notes


# ---- renaming -----------------------------------------------------------------------------------
@dataclass
class Renamed:
    state_dict: dict[str, torch.Tensor]
    dropped_pretraining: list[str] = field(default_factory=list)
    dropped_buffers: list[str] = field(default_factory=list)


def rename_original(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Renamed:
    """BLIP/MISS names → `BlipForQuestionAnswering` names; buffers and pretraining-only parts dropped (listed)."""
    out = Renamed({})
    for key, value in state_dict.items():
        if PRETRAINING_ONLY.search(key):
            out.dropped_pretraining.append(key)
            continue
        if BUFFERS.search(key):
            out.dropped_buffers.append(key)
            continue
        for pattern, replacement in RENAMES:
            new, n = re.subn(pattern, replacement, key)
            if n:
                out.state_dict[new] = value
                break
        else:
            raise ModelLoadError(f"{source}: key {key!r} is not a MISS/BLIP-VQA weight (no conversion rule); "
                                 "expected visual_encoder.*, text_encoder.*, text_decoder.* or a pretraining head")
    return out


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """BLIP's `interpolate_pos_embed`: the class token kept, the patch grid resized bicubic to `grid` x `grid`."""
    dim, n_extra = pos_embed.shape[-1], 1
    old = int((pos_embed.shape[-2] - n_extra) ** 0.5)
    if old == grid:
        return pos_embed
    extra, tokens = pos_embed[:, :n_extra], pos_embed[:, n_extra:]
    tokens = tokens.reshape(-1, old, old, dim).permute(0, 3, 1, 2)
    tokens = torch.nn.functional.interpolate(tokens.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    tokens = tokens.to(pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, tokens), dim=1)


def _summary(keys: list[str]) -> list[str]:
    """`itm_head (2 tensors)`-style lines, grouped by top-level module."""
    return [f"{k} ({n} tensor{'s' * (n != 1)})" for k, n in sorted(Counter(key.split(".")[0] for key in keys).items())]


# ---- converting ---------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    out: str
    dropped_pretraining: list[str]
    dropped_buffers: list[str]
    notes: list[str]
    pos_embed: str | None
    vocab_size: int


def _tokenizer(tokenizer_from: str) -> Any:
    """A bert-base-uncased tokenizer from a local directory, with BLIP's `[DEC]` and `[ENC]` added."""
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(tokenizer_from, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"--tokenizer-from {tokenizer_from}: not a BERT tokenizer directory ({e})") from e
    # BLIP's init_tokenizer: bert-base-uncased + [DEC] (decoder bos) + [ENC] (encoder's first token).
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _check_vocabulary(sd: dict[str, torch.Tensor], cfg: Any, tok: Any, src: Path, config_from: str) -> None:
    """The tokenizer, the target config's special ids and the checkpoint's embeddings agree (and tied weights are
    equal), or a ModelLoadError says which does not."""
    vocab = cfg.text_config.vocab_size
    if len(tok) != vocab:
        raise ModelLoadError(f"the tokenizer has {len(tok)} tokens but the target config's vocab_size is {vocab} "
                             f"(MISS: bert-base-uncased + [DEC] + [ENC] = {MISS_VOCAB}); pass --tokenizer-from with a "
                             "local bert-base-uncased directory")
    specials = {"bos_token_id": "[DEC]", "pad_token_id": tok.pad_token, "sep_token_id": tok.sep_token}
    wrong = [f"{k}={getattr(cfg.text_config, k)} but {t} is {tok.convert_tokens_to_ids(t)}"
             for k, t in specials.items() if getattr(cfg.text_config, k) != tok.convert_tokens_to_ids(t)]
    if wrong or "[ENC]" not in tok.get_vocab():
        raise ModelLoadError(f"--config-from {config_from}: text_config does not match the tokenizer: "
                             f"{'; '.join(wrong) or '[ENC] missing'}")
    for key in WORD_EMBEDDINGS:
        if key in sd and sd[key].shape[0] != vocab:
            raise ModelLoadError(f"{src}: key {key!r} has {sd[key].shape[0]} rows but the vocabulary has {vocab} "
                                 f"tokens (MISS: bert-base-uncased + [DEC] + [ENC] = {MISS_VOCAB})")
    for tied, owner in TIED.items():
        if tied in sd and owner in sd and not torch.equal(sd[tied], sd[owner]):
            raise ModelLoadError(f"{src}: key {tied!r} differs from {owner!r}; transformers ties them")


def convert_miss(src: Path | str, config_from: str, out: Path | str, tokenizer_from: str | None = None,
                 log: Any = print) -> ConversionReport:
    """Convert an original MISS/BLIP checkpoint into an HF directory at `out` (written whole or not at all).

    `config_from` is a MISS preset (`miss-base`) or an HF BLIP directory giving the target architecture;
    its tokenizer is used unless `tokenizer_from` names a bert-base-uncased directory.
    """
    from transformers import BlipConfig, BlipForQuestionAnswering

    from raymed.models import load_processor, resolve
    from raymed.models.miss import BLIP_VIT_LN_EPS, MISS_LABEL_SMOOTHING, MISS_ORIGINAL

    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"--out {out} exists and is not empty; remove it or choose another directory")
    ref = resolve(config_from)
    if ref.family.name != "miss":
        raise ModelLoadError(f"--config-from {config_from!r} is a {ref.family.name!r} model, not 'miss'")
    cfg = ref.preset.build_config() if ref.preset else BlipConfig.from_pretrained(ref.path)
    cfg.text_config.label_smoothing = MISS_LABEL_SMOOTHING
    cfg.vision_config.layer_norm_eps = BLIP_VIT_LN_EPS
    tok = _tokenizer(tokenizer_from) if tokenizer_from else load_processor(ref).tokenizer

    state, notes = read_original(src)
    renamed = rename_original(state, str(src))
    sd = renamed.state_dict

    pos_note = None
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    if POS_EMBED in sd and sd[POS_EMBED].shape[-2] != grid * grid + 1:
        old = sd[POS_EMBED].shape[-2]
        sd[POS_EMBED] = interpolate_pos_embed(sd[POS_EMBED], grid)
        pos_note = f"visual_encoder.pos_embed interpolated (bicubic) from {old} to {grid * grid + 1} positions"

    vocab = cfg.text_config.vocab_size
    _check_vocabulary(sd, cfg, tok, src, config_from)

    model = BlipForQuestionAnswering(cfg)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ModelLoadError(f"{src}: weights do not fit the --config-from architecture: {e}") from e
    missing = [k for k in result.missing_keys if k not in TIED]
    if result.unexpected_keys or missing:
        raise ModelLoadError(f"{src}: keys not in the target architecture: {result.unexpected_keys[:10]}; "
                             f"target weights the checkpoint lacks: {missing[:10]}")
    model.tie_weights()

    report = ConversionReport(str(out), renamed.dropped_pretraining, renamed.dropped_buffers, notes, pos_note, vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        ref.family.new_processor(cfg, MISS_ORIGINAL, tokenizer=tok).save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps({"source": str(src), **asdict(report)}, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in notes:
        log(f"note: {note}")
    if report.dropped_pretraining:
        log("dropped pretraining-only weights: " + ", ".join(_summary(report.dropped_pretraining)))
    if report.dropped_buffers:
        log("dropped buffers: " + ", ".join(report.dropped_buffers))
    if pos_note:
        log(pos_note)
    return report
