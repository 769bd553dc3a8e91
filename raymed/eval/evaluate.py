"""`python -m raymed.eval --model RUN_OR_DIR --data PREPARED_DIR [--split test] [--out DIR]`: evaluate a model on a
prepared dataset and write `metrics.json` + `predictions.jsonl`.

`--model` is a training run folder (its latest checkpoint), one checkpoint, an HF model directory (e.g. from
`raymed.train.export`) or a preset. Prompts, image preprocessing, generation length and input length are the ones the
run trained with (from its checkpoint; the defaults for a directory or preset). Runs in this process (no Ray),
on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from raymed.config import Config, ConfigError


class EvalError(ValueError):
    """An evaluation that cannot run as asked: no checkpoint, another task's data, an empty split."""


def evaluate(model_spec: str, data_dir: str, *, split: str = "test", out: Path | None = None,
             max_rows: int | None = None, batch_size: int | None = None,
             max_new_tokens: int | None = None) -> dict[str, Any]:
    """Metrics of `model_spec` on `split` of a prepared dataset; predictions written under `out`."""
    import torch

    from raymed.eval import predict
    from raymed.data.rows import read_split_rows
    from raymed.data.prepare import read_manifest

    manifest = _manifest(data_dir, read_manifest)
    if split not in manifest["splits"]:
        raise EvalError(f"{data_dir}: no split {split!r}; splits: {', '.join(manifest['splits'])}")
    try:
        model, ref, processor, cfg, fine_tuned = predict.load(model_spec)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    _check_task(model_spec, ref, cfg if fine_tuned else None, manifest, split)
    rows = read_split_rows(data_dir, split)[:max_rows]
    if not rows:
        raise EvalError(f"{data_dir}: split {split!r} has no rows")
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    preds = predict.answer(model, ref.family, processor, cfg, rows, batch_size=batch_size,
                           max_new_tokens=max_new_tokens)
    metrics = predict.score(rows, preds)
    summary = {"model": model_spec, "data": str(data_dir), "split": split, "rows": len(rows), "metrics": metrics}
    if out is not None:
        predict.write(out, predict.records(rows, preds), summary)
    return summary


def _manifest(data_dir: str, read_manifest: Any) -> dict[str, Any]:
    try:
        return read_manifest(data_dir)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise EvalError(f"{data_dir}: not a prepared dataset ({e}); run `python -m raymed.data prepare` first") from None


def _check_task(model_spec: str, ref: Any, cfg: Config | None, manifest: dict[str, Any], split: str) -> None:
    """Refuse data of another task than the model answers (VQA vs report generation); `cfg`: the config the
    model was fine-tuned with (None for a preset or an HF directory: nothing to compare)."""
    from raymed.data.prepare import read_manifest

    tasks = {t for t, n in manifest["splits"][split].get("task", {}).items() if n}
    if ref.family.name == "miss" and "report" in tasks:
        raise EvalError(f"{model_spec}: a MISS (BLIP-VQA) model answers questions; the data is a report-generation "
                        "set (task 'report')")
    if cfg is None:
        return
    trained: set[str] = {"vqa"} if cfg.data.path is None else set()  # the built-in synthetic data is VQA
    if cfg.data.path is not None:
        try:
            splits = read_manifest(cfg.data.path)["splits"]
            trained = {t for t, n in splits.get(cfg.data.train_split, {}).get("task", {}).items() if n}
        except (FileNotFoundError, OSError, ValueError):
            trained = set()  # the training data is not reachable from here: nothing to compare
    if trained and tasks and not tasks & trained:
        raise EvalError(f"{model_spec} was fine-tuned for task(s) {sorted(trained)}, but split {split!r} holds "
                        f"task(s) {sorted(tasks)}; evaluate it on data of its own task")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run folder, checkpoint, HF model directory or preset")
    ap.add_argument("--data", required=True, help="prepared dataset directory (python -m raymed.data prepare)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, help="folder for metrics.json + predictions.jsonl "
                                             "(default: <model>/eval/<dataset>-<split> for a run, else none)")
    ap.add_argument("--max-rows", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    args = ap.parse_args(argv)
    out = args.out
    if out is None and Path(args.model).is_dir() and not (Path(args.model) / "config.json").is_file():
        out = Path(args.model) / "eval" / f"{Path(args.data).name}-{args.split}"
    try:
        summary = evaluate(args.model, args.data, split=args.split, out=out, max_rows=args.max_rows,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary["metrics"], indent=2))
    print(f"{summary['rows']} rows of {args.data} [{args.split}]" + (f"; wrote {out}/predictions.jsonl" if out else ""))
    return 0
