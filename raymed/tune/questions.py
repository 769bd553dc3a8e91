"""`python -m raymed.tune.questions SWEEP_DIR [--n N --seed S | --data DIR] [--out FILE.json]`: what each method of a
finished sweep learned, per question type, against the base's zero-shot answers on the same questions.

Analysis of a sweep's results (beside `raymed.tune.report`), not a benchmark: no timing, no targets.

Reads `results.json` of one sweep (`python -m raymed.tune --out DIR` writes `DIR/<name>/results.json`), takes
the best trial of each method, rebuilds it from its last checkpoint (`raymed.train.checkpoint.load_trainable`: base +
method + trained tensors, what `raymed.train.export` merges) and answers a synthetic test split in-process with the
sweep's settings (`raymed.eval.predict.answer`: greedy, the family's own encode and generate, no Ray). By default the
split is the sweep's own test set (the overall accuracy then repeats the sweep's, a check of the checkpoint);
`--n/--seed/--rows` ask a fresh, larger one.

Per method: accuracy per question type (VQA-RAD `question_type`: pres, pos, size, count, organ, modality),
overall, and the paired comparison with zero-shot on the same rows: questions gained / lost and the exact
McNemar p-value (`raymed.tune.stats.mcnemar`: scipy's two-sided binomial test on the discordant pairs), so "better
than zero-shot" is a measured statement rather than a difference of two noisy means.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from raymed.tune.stats import mcnemar
from raymed.tables import table

ZERO_SHOT = "zero-shot"
SWEEP_ACC, SWEEP_ZERO_SHOT = "eval/test/overall_acc", "zeroshot/test/overall_acc"  # what the sweep measured
BATCH_SIZE = 60  # questions answered per generate call


def question_type(row: dict[str, Any]) -> str:
    """The row's question type: VQA-RAD's `question_type`, SLAKE's `content_type` (from `extra`), else its
    answer type."""
    try:
        extra = json.loads(row.get("extra") or "{}")
        kind = extra.get("question_type") or extra.get("content_type")
    except (TypeError, ValueError, AttributeError):
        kind = None
    return str(kind or row.get("answer_type") or "unknown").lower()


def hits(preds: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[bool]:
    """Exact match after the metrics' normalisation (what `vqa_metrics` counts)."""
    from raymed.eval.metrics import normalize_answer

    return [normalize_answer(p) == normalize_answer(r["answer"]) for p, r in zip(preds, rows, strict=True)]


def breakdown(correct: Sequence[bool], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall accuracy and accuracy / count per question type."""
    by: dict[str, list[bool]] = defaultdict(list)
    for ok, row in zip(correct, rows, strict=True):
        by[question_type(row)].append(ok)
    return {"overall": sum(correct) / len(correct) if correct else float("nan"),
            "types": {k: {"acc": sum(v) / len(v), "n": len(v)} for k, v in sorted(by.items())}}


def run(sweep_dir: Path | str, n: int | None = None, seed: int | None = None, rows: int | None = None,
        style: str | None = None, methods: Sequence[str] | None = None, data: str | None = None,
        split: str | None = None) -> dict[str, Any]:
    """The breakdown document of a sweep: config, machine, one row per method (and zero-shot)."""
    import torch

    from raymed.train.checkpoint import find_checkpoint, load_trainable
    from raymed.config import Config
    from raymed.data.plan import synthetic_dataset
    from raymed.data.rows import read_split_rows
    from raymed.machine import describe
    from raymed.models import load_model, load_processor, resolve
    from raymed.eval.predict import answer

    started = time.time()
    torch.manual_seed(0)
    sweep_dir = Path(sweep_dir)
    summary = json.loads((sweep_dir / "results.json").read_text())
    trials = {t["trial_id"]: t for t in summary["trials"]}
    best = [trials[i] for i in summary["best_per_method"].values()]  # {method (or "model · method"): trial id}
    best = [t for t in best if methods is None or t["method"] in methods]
    if not best:
        raise ValueError(f"{sweep_dir}/results.json: no best trial for methods {methods}")
    checkpoints = {t["trial_id"]: Path(find_checkpoint(sweep_dir / "runs" / t["trial_id"])) / "model" for t in best}
    meta = json.loads((next(iter(checkpoints.values())) / "raymed.json").read_text())
    cfg_data = meta["config"]["data"]
    train_seed = meta["config"]["train"]["seed"]
    split = split or cfg_data["eval_split"]
    if data or cfg_data.get("path"):  # a prepared dataset: the one given, else the sweep's own
        data_dir = data or cfg_data["path"]
        own = data_dir == cfg_data.get("path") and split == cfg_data["eval_split"]
        style, n, seed = None, None, None
    else:  # the built-in synthetic data: the sweep's own set, or a fresh one (--n / --seed / --style)
        style = style or cfg_data["synth_style"]
        n = n or cfg_data["synth_n"]
        seed = train_seed if seed is None else seed
        own = (style, n, seed) == (cfg_data["synth_style"], cfg_data["synth_n"], train_seed) and split == "test"
        data_dir = str(synthetic_dataset(style, n, seed))
    limit = rows or (cfg_data["max_eval_rows"] if own else None)  # the sweep's own set: the rows it evaluated
    test = read_split_rows(data_dir, split)[:limit]
    if not test:
        raise ValueError(f"{data_dir}: split {split!r} has no rows")
    cfg = Config.model_validate(meta["config"])  # the sweep's prompt, image, input and generation settings

    ref = resolve(meta["model"])
    base = load_model(ref, seed=train_seed)
    base_hits = hits(answer(base, ref.family, load_processor(ref), cfg, test, batch_size=BATCH_SIZE), test)
    zero_shot = breakdown(base_hits, test)
    out_rows = [{"method": ZERO_SHOT, "lr": None, "trainable": 0, "sweep_acc": best[0]["metrics"].get(SWEEP_ZERO_SHOT),
                 **_flat(zero_shot), "gained": 0, "lost": 0, "p": 1.0}]
    for t in best:
        model, processor, _ = load_trainable(checkpoints[t["trial_id"]])
        h = hits(answer(model, ref.family, processor, cfg, test, batch_size=BATCH_SIZE), test)
        out_rows.append({"method": t["method"], "lr": t["lr"], "trainable": t["params"]["trainable"],
                         "sweep_acc": t["metrics"].get(SWEEP_ACC), **_flat(breakdown(h, test)),
                         **mcnemar(base_hits, h)})
    counts = {k: v["n"] for k, v in zero_shot["types"].items()}  # every method answered the same rows
    config = {"sweep": str(sweep_dir), "metric": summary["metric"], "data": data_dir, "split": split,
              "style": style, "n_images": n, "seed": seed, "sweeps_own_test_set": own,
              "rows": len(test), "type_counts": counts, "model": meta["model"],
              "max_new_tokens": cfg.train.max_new_tokens}
    command = " ".join([Path(sys.executable).name, "-m", "raymed.tune.questions", *sys.argv[1:]])
    return {"analysis": "questions", "command": command, "config": config,
            "machine": describe(load=True, with_commit=True), "wall_s": round(time.time() - started, 1),
            "rows": out_rows}


def _flat(b: dict[str, Any]) -> dict[str, Any]:
    return {"overall": b["overall"], **{f"acc/{k}": v["acc"] for k, v in b["types"].items()}}


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    types = list(c["type_counts"])
    columns = ([("method", "method"), ("lr", "lr"), ("trainable", "trainable"), ("sweep_acc", "sweep acc"),
                ("overall", f"overall ({c['rows']})")]
               + [(f"acc/{k}", f"{k} ({c['type_counts'][k]})") for k in types]
               + [("gained", "gained"), ("lost", "lost"), ("p", "p vs zero-shot")])
    m = doc["machine"]
    return "\n".join([
        f"questions: {m['cpu']}, {m['cores']} cores, load {m['load_average']}, torch {m['versions']['torch']}; "
        f"{doc['wall_s']:.0f} s",
        f"sweep {c['sweep']} ({c['model']}): "
        + (f"test split of synthetic style {c['style']!r}, {c['n_images']} images, seed {c['seed']}"
           if c.get("style") else f"split {c.get('split')!r} of {c.get('data')}")
        + f": {c['rows']} questions; exact match; p: exact McNemar test against zero-shot",
        table(doc["rows"], columns),
    ])


def add_arguments(ap: Any) -> None:
    ap.add_argument("sweep_dir", help="one sweep's experiment folder (holds results.json and runs/)")
    ap.add_argument("--n", type=int, default=None, help="synthetic images (20%% test; default: the sweep's own)")
    ap.add_argument("--seed", type=int, default=None, help="synthetic seed (default: the sweep's own)")
    ap.add_argument("--rows", type=int, default=None, help="first N test questions (default: the sweep's limit "
                    "on its own set, all on another)")
    ap.add_argument("--style", default=None, help="synthetic style (default: the sweep's synth_style)")
    ap.add_argument("--methods", default=None, help="space-separated methods (default: every method's best)")
    ap.add_argument("--data", default=None, help="a prepared dataset to ask instead (default: the sweep's own data)")
    ap.add_argument("--split", default=None, help="split of that dataset (default: the sweep's eval split)")
    ap.add_argument("--out", default=None, help="write the JSON document here")


def from_args(args: Any) -> dict[str, Any]:
    return run(args.sweep_dir, n=args.n, seed=args.seed, rows=args.rows, style=args.style,
               methods=args.methods.split() if args.methods else None, data=args.data, split=args.split)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.tune.questions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    doc = from_args(args)
    print(render(doc), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
        print(f"[questions] wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
