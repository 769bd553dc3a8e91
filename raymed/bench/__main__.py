"""`python -m raymed.bench SUITE [options] [--out FILE.json]`: run one benchmark suite.

Suites: methods, overhead, padding, data, checkpoint, sweep, load, gpu (`python -m raymed.bench SUITE --help`).
Each prints a table (figures, machine, load) and, with `--out`, writes the JSON document.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

SUITES = {
    "methods": "step time, training memory and trainable parameters per method (plain PyTorch loop)",
    "overhead": "raymed's recipe (1 Ray Train worker, DeepSpeed ZeRO-0/2) vs a plain PyTorch loop",
    "padding": "training throughput at a long data.max_length vs a short one, same rows (pad to the batch)",
    "data": "Ray Data pipeline vs a torch DataLoader with the same decoding and workers",
    "checkpoint": "bytes written per checkpoint (model/ and resume/) vs trainable bytes, per method",
    "sweep": "ASHA vs the full grid on the default sweep: trial-epochs and best method",
    "load": "host memory per worker loading a model under ZeRO-3: whole vs partitioned while loading",
    "gpu": "LLaVA-Med v1.5 architecture, random weights, ln vs full (ZeRO-3), bf16 (CUDA only)",
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = argparse.ArgumentParser(prog="python -m raymed.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, help_text in SUITES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"raymed.bench.{name}").add_arguments(p)
        p.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    from raymed.bench.common import write_json

    suite = importlib.import_module(f"raymed.bench.{args.suite}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft / DeepSpeed / Ray deprecation chatter
        doc = suite.from_args(args)
    print(suite.render(doc), flush=True)
    write_json(doc, args.out)
    return 0 if not doc.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
