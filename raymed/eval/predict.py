"""Answers, scores and `predictions.jsonl`: the one place a model's answers are generated and written.

Used by the worker's evaluation (every epoch, every eval set), by `raymed.eval` (a checkpoint, an exported
directory or a preset on a prepared dataset), by `raymed.eval.infer` (one image, one question) and by `raymed.tune.questions`
(a sweep's best trials per question type). All of them encode
with the model family's own `encode(train=False)`, so the prompt template and image preprocessing are the ones
training used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


def encoder(family: Any, processor: Any, max_length: int, template: str = "auto", image_aspect: str = "auto") -> Any:
    """Decode + encode rows for generation (prompt only), as the training stream does for training: the same
    prompt template (`model.template`) and image preprocessing (`data.image_aspect`)."""
    from raymed.data.transform import DecodeAndEncode

    return DecodeAndEncode(lambda: lambda r: family.encode(processor, r, train=False, max_length=max_length,
                                                          template=template, image_aspect=image_aspect))


def answer_rows(model: torch.nn.Module, family: Any, processor: Any, rows: Sequence[Mapping[str, Any]], *,
                batch_size: int, max_new_tokens: int, max_length: int, template: str = "auto",
                image_aspect: str = "auto", n_batches: int | None = None, bf16: bool | None = None,
                filler: Mapping[str, Any] | None = None, pad_to_multiple_of: int = 8,
                **generate_kwargs: Any) -> list[str]:
    """Generated answers to ``rows``, in order.

    ``n_batches`` larger than needed runs extra batches (repeating the last rows, answers dropped): ZeRO-3 ranks
    must call `generate` the same number of times. A rank with no rows at all still runs them, on ``filler``, a
    dummy row (``rows=[]``). ``bf16``: images in bf16 (default: when the model's weights are). Each batch is cut to
    its longest prompt, rounded up to ``pad_to_multiple_of`` (`Family.cut_padding`); ``max_length`` only truncates.
    """
    encode = encoder(family, processor, max_length, template, image_aspect)
    first = next(model.parameters())
    device = first.device
    bf16 = first.dtype == torch.bfloat16 if bf16 is None else bf16
    needed = math.ceil(len(rows) / batch_size)
    answers: list[str] = []
    for b in range(max(needed, n_batches or 0)):
        chunk = list(rows[b * batch_size:(b + 1) * batch_size]) or list(rows[-1:]) or ([filler] if filler else [])
        if not chunk:
            break
        enc = family.cut_padding(processor, encode({k: [r[k] for r in chunk] for k in chunk[0]}), train=False,
                                 multiple=pad_to_multiple_of)
        batch = {k: torch.from_numpy(v).to(device) for k, v in enc.items() if k != "id"}
        if bf16:
            batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        texts = family.generate(model, processor, batch, max_new_tokens, **generate_kwargs)
        if b < needed:
            answers.extend(texts)
    return answers


def load(model_spec: str) -> tuple[torch.nn.Module, Any, Any, Any, bool]:
    """A model to answer with: (model, ref, processor, cfg, fine_tuned). `model_spec` is a run folder, a checkpoint,
    an HF model directory or a preset (`raymed.train.checkpoint.load_for_inference`); `cfg` is the `Config` the model was
    fine-tuned with, the defaults for a directory or preset (`fine_tuned` False). Raises FileNotFoundError."""
    from raymed.train.checkpoint import load_for_inference
    from raymed.config import Config

    model, ref, processor, config = load_for_inference(model_spec)
    return model, ref, processor, Config.model_validate(config) if config else Config(), bool(config)


def eval_batch_size(family: Any, processor: Any, cfg: Any) -> int:
    """Questions per `generate` call: the model's recipe's when it fixes one (MISS evaluates in batches of 100 in file
    order, and its answers depend on the batch: its decoder attends to the question padding), else
    `train.eval_batch_size`. Batches are cut from the rows in order, whatever the number of workers, so the same
    checkpoint answers the same (raymed.train.recipe's evaluation, `raymed eval`)."""
    return family.eval_batch_size(processor) or cfg.train.eval_batch_size


def answer(model: torch.nn.Module, family: Any, processor: Any, cfg: Any, rows: Sequence[Mapping[str, Any]], *,
           batch_size: int | None = None, max_new_tokens: int | None = None, **options: Any) -> list[str]:
    """Answers with the recipe of `cfg`, the `Config` the model was fine-tuned with (defaults for a directory or
    preset): its prompt template, image preprocessing, input length, generation length and eval batch size. Used by
    the worker's evaluation (`options`: its ZeRO lock-step settings for `answer_rows`), `raymed.eval`, `raymed.eval.infer`
    and `raymed.tune.questions`."""
    model.eval()
    with torch.no_grad():
        return answer_rows(model, family, processor, rows,
                           batch_size=batch_size or eval_batch_size(family, processor, cfg),
                           max_new_tokens=max_new_tokens or cfg.train.max_new_tokens, max_length=cfg.data.max_length,
                           template=cfg.model.template, image_aspect=cfg.data.image_aspect,
                           pad_to_multiple_of=cfg.data.pad_to_multiple_of, **options)


def score(rows: Sequence[Mapping[str, Any]], preds: Sequence[str]) -> dict[str, float]:
    """Aggregate metrics of aligned rows and predictions: report metrics for report rows, else Med-VQA."""
    from raymed.eval.metrics import report_metrics, vqa_metrics

    refs = [r["answer"] for r in rows]
    if rows and all(r["task"] == "report" for r in rows):
        return report_metrics(list(preds), refs)
    return vqa_metrics(list(preds), refs, [r["answer_type"] for r in rows])


def records(rows: Sequence[Mapping[str, Any]], preds: Sequence[str]) -> list[dict[str, Any]]:
    """One prediction record per row: id, question, reference, prediction, answer type, per-row scores."""
    from raymed.eval import metrics

    per_row = metrics.row_scores([r["answer"] for r in rows], list(preds), [r.get("answer_type") for r in rows],
                                 [r.get("task", "vqa") for r in rows])
    return [{"id": r["id"], "question": r.get("question"), "reference": r["answer"], "prediction": p,
             "answer_type": r.get("answer_type"), "task": r.get("task"), **s}
            for r, p, s in zip(rows, preds, per_row)]


def write(out_dir: Path, recs: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> None:
    """`predictions.jsonl` (one record per line) and `metrics.json` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / PREDICTIONS_FILE).open("w") as f:
        for rec in recs:
            f.write(json.dumps(rec, default=_plain) + "\n")
    (out_dir / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2, default=_plain) + "\n")


def read(path: Path) -> list[dict[str, Any]]:
    """The records of a `predictions.jsonl` file (or of the one in a folder)."""
    path = path / PREDICTIONS_FILE if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
