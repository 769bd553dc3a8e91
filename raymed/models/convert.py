"""`python -m raymed.models.convert`: original MISS / LLaVA-Med checkpoints → transformers (HF) model directories.

    python -m raymed.models.convert --family miss  --input model_base_vqa.pth  --config-from DIR_OR_PRESET --out DIR \
        [--tokenizer-from BERT_BASE_UNCASED_DIR]
    python -m raymed.models.convert --family llava --input llava-med-v1.5-mistral-7b/ --out DIR

The LLaVA-Med v1.5 release directory (`llava_mistral` config, sharded weights, sentencepiece tokenizer) is
converted from its own files (`raymed.models.llava_convert`); `--config-from` is not needed for it.
`--input` is a file (`.safetensors`, `.bin`, `.pth`) or a directory of shards. Pickled checkpoints are read
with `torch.load(weights_only=True)` (no code execution). `--config-from` supplies the HF config and processor
(an HF directory, or a preset with a local processor such as `tiny-llava`): the original releases carry their
own config formats (`llava_mistral`, BLIP's yaml), whose architecture must match it. MISS/BLIP originals go through
`raymed.models.miss_convert` (restricted unpickler for their pickled config, pretraining heads dropped and listed,
`pos_embed` interpolated, vocabulary checked, MISS's recipe written with the processor).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from raymed.models import ModelLoadError, get_family, load_model, load_processor, resolve
from raymed.models.llava_convert import convert_llava_med
from raymed.models.miss_convert import convert_miss


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors from a checkpoint file or a directory of shards, safely."""
    files = sorted(path.glob("*.safetensors")) or sorted([*path.glob("*.bin"), *path.glob("*.pth")]) \
        if path.is_dir() else [path]
    if not files:
        raise ModelLoadError(f"{path}: no .safetensors, .bin or .pth files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = load_file(f)
        else:
            part = torch.load(f, map_location="cpu", weights_only=True)
            part = part.get("model", part.get("state_dict", part)) if isinstance(part, dict) else part
        state.update(part)
    return state


def convert(family_name: str, src: Path, config_from: str, out: Path) -> None:
    """Convert and save. Every weight of the target architecture must come from the checkpoint (a weight tied to a
    converted one counts): a missing one would silently keep `--config-from`'s value, so it is refused."""
    if family_name == "miss":  # MISS/BLIP originals: their own reader and rules (raymed.models.miss_convert)
        convert_miss(src, config_from, out)
        return
    family = get_family(family_name)
    ref = resolve(config_from)
    if ref.family is not family:
        raise ModelLoadError(f"--config-from {config_from!r} is a {ref.family.name!r} model, not {family_name!r}")
    model = load_model(ref)
    converted = family.convert_original(read_state_dict(src))
    result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys:
        raise ModelLoadError(f"converted keys not in the target architecture: {result.unexpected_keys[:10]}")
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in converted if k in state}
    missing = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]
    if missing:
        raise ModelLoadError(f"{src}: the checkpoint lacks {len(missing)} weight(s) of the --config-from "
                             f"architecture, e.g. {missing[:5]}; nothing was written (a converted model must not "
                             "keep weights it was not given)")
    model.save_pretrained(out, safe_serialization=True)
    load_processor(ref).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.models.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=["llava", "miss"])
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--config-from", help="HF model directory or preset giving config + processor (MISS; LLaVA "
                    "checkpoints that are not a release directory)")
    ap.add_argument("--vision-config", type=Path, help="llava: a CLIP config.json for a vision tower the converter "
                    "does not know by name (default: known towers by name, others from the tensor shapes)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokenizer-from", help="miss: a local bert-base-uncased directory ([DEC], [ENC] are added)")
    args = ap.parse_args(argv)
    try:
        if args.family == "miss":
            if args.config_from is None:
                raise ModelLoadError("--config-from is required for --family miss")
            convert_miss(args.input, args.config_from, args.out, args.tokenizer_from)
            print(f"wrote {args.out}")
            return 0
        if args.family == "llava" and args.config_from is None:
            if not args.input.is_dir():
                raise ModelLoadError(f"--input {args.input}: expected the release directory (config.json, shards, "
                                     "tokenizer), or pass --config-from for a bare checkpoint file")
            summary = convert_llava_med(args.input, args.out, args.vision_config)
            print(f"wrote {args.out} ({summary['dtype']}, vocabulary {summary['vocab_size']}, "
                  f"{summary['shards']} shards)")
            return 0
        convert(args.family, args.input, args.config_from, args.out)
    except (ModelLoadError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
