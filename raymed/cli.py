"""`raymed COMMAND [args ...]`: one command for every raymed tool.

Each command is a module with `main(argv) -> int`, imported only when run (so `raymed --help` is fast);
`raymed train ...` is the same as `python -m raymed.train ...` (so are `tune`, `eval`, `data` and `bench`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module whose `main(argv)` runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("raymed.train.launch", "one fine-tuning run on a Ray cluster (Ray Train + DeepSpeed)"),
    "tune": ("raymed.tune.sweep", "a Ray Tune sweep over methods x towers x learning rates"),
    "report": ("raymed.tune.report", "rebuild a sweep's comparison report (tables, frontier plot)"),
    "questions": ("raymed.tune.questions", "a sweep's best trials per question type vs zero-shot (paired test)"),
    "data": ("raymed.data.cli", "prepare, generate and inspect datasets (Parquet shards)"),
    "eval": ("raymed.eval.evaluate", "evaluate a fine-tuned run or a model on a prepared dataset"),
    "infer": ("raymed.eval.infer", "answer questions about images with a fine-tuned model"),
    "export": ("raymed.train.export", "a run's checkpoint as a plain HF model or a peft adapter"),
    "convert": ("raymed.models.convert", "original LLaVA-Med / MISS checkpoints to HF model directories"),
    "params": ("raymed.models.params", "trainable-parameter accounting of a model x method x towers"),
    "bench": ("raymed.bench.__main__", "benchmark suites (step time, memory, data, checkpoints, sweeps)"),
}


def usage() -> str:
    """The top-level help: every command with its description."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return ("usage: raymed COMMAND [args ...]\n\n"
            "Fine-tune medical vision-language models on Ray. Commands:\n\n" + "\n".join(lines) +
            "\n\n`raymed COMMAND --help` describes a command.\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `argv[0]` to its module's `main(argv[1:])`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"raymed: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as exit_:  # argparse's --help and usage errors
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
