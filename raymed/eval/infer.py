"""`python -m raymed.eval.infer --model RUN_OR_DIR --image FILE --question TEXT`: one answer from a fine-tuned model.

The same prompt template, image preprocessing and generation length as training and evaluation (the run's own,
read from its checkpoint). `--model` takes what `raymed.eval` takes: a run folder, a checkpoint, an HF model
directory or a preset. Report models: leave `--question` empty for a report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class InferError(ValueError):
    """An input that cannot be answered: no such image, an image that does not decode, no checkpoint."""


def answer(model_spec: str, image: Path, question: str, max_new_tokens: int | None = None) -> str:
    """The model's answer to `question` about the image file `image`."""
    from raymed.eval import predict
    from raymed.data.images import image_problem

    if not image.is_file():
        raise InferError(f"{image}: no such image file")
    data = image.read_bytes()
    problem = image_problem(data)
    if problem:
        raise InferError(f"{image}: {problem}")
    try:
        model, ref, processor, cfg, _ = predict.load(model_spec)
    except FileNotFoundError as e:
        raise InferError(str(e)) from None
    row = {"id": "0", "image": data, "question": question, "answer": "", "task": "vqa" if question else "report",
           "answer_type": "open"}
    [text] = predict.answer(model, ref.family, processor, cfg, [row], batch_size=1, max_new_tokens=max_new_tokens)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.eval.infer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run folder, checkpoint, HF model directory or preset")
    ap.add_argument("--image", required=True, type=Path)
    ap.add_argument("--question", default="", help="the question (empty: a report, for report models)")
    ap.add_argument("--max-new-tokens", type=int)
    args = ap.parse_args(argv)
    try:
        print(answer(args.model, args.image, args.question, args.max_new_tokens))
    except InferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
