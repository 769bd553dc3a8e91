"""`python -m raymed.train.export --run DIR --out DIR [--adapter]`: a plain HF model directory with the fine-tuned
parameters merged into the base (LoRA / IA3 / LN-tuning adapters merged; intrinsic methods copied in), or
with `--adapter` a standard peft adapter directory (peft methods only; for MISS, of the text encoder).

`--run` is a run directory (`<storage>/<name>`, its latest checkpoint is used) or one checkpoint directory.
Prompt-learning methods (prefix, prompt) cannot be merged: export them with `--adapter`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from raymed import storage
from raymed.train.checkpoint import find_checkpoint, load_trainable, peft_host


def export(run: str | Path, out: str | Path, adapter: bool = False) -> str:
    """Write the exported model (or adapter) into `out` (a folder or URI); return `out`."""
    ckpt = find_checkpoint(run)
    with tempfile.TemporaryDirectory(prefix="raymed-export-") as tmp, storage.staged_output(out) as local:
        model_dir = storage.join(ckpt, "model")
        if storage.is_uri(model_dir):  # only model/ (the trainable tensors), never resume/
            storage.download_dir(model_dir, tmp)
            model_dir = tmp
        _export(Path(model_dir), ckpt, local, adapter)
    return storage.resolve(out)


def _export(model_dir: Path, ckpt: str, out: Path, adapter: bool) -> None:
    model, processor, meta = load_trainable(model_dir)
    host = peft_host(model)
    if adapter:
        if host is None:
            raise ValueError(f"method {meta['method']!r} is not a peft method: it has no adapter; export "
                             "without --adapter for a merged model")
        host.save_pretrained(out)
    else:
        if host is not None:
            if host.peft_config["default"].is_prompt_learning:
                raise ValueError(f"method {meta['method']!r} (prompt learning) cannot be merged into the base "
                                 "model; export its peft adapter with --adapter")
            merged = host.merge_and_unload()
            if host is model:
                model = merged
            else:  # MISS: the wrapped text encoder
                model.text_encoder = merged
        model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "raymed.json").write_text(json.dumps({"exported_from": str(ckpt), **meta}, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.train.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run or checkpoint folder, or its URI (s3://, gs://)")
    ap.add_argument("--out", required=True, help="output folder or URI")
    ap.add_argument("--adapter", action="store_true", help="write the peft adapter instead of a merged model")
    args = ap.parse_args(argv)
    try:
        path = export(args.run, args.out, adapter=args.adapter)
    except (FileNotFoundError, ValueError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
