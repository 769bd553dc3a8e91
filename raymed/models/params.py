"""`python -m raymed.models.params`: trainable-parameter accounting for a model x method x towers.

Full-size presets are built on the `meta` device: exact counts in seconds, no memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from raymed.models.accounting import format_table
from raymed.models.methods import METHODS, MethodError, apply_method
from raymed.models import FAMILIES, ModelLoadError, load_model, resolve


def list_all() -> str:
    lines = ["families:"]
    for f in FAMILIES.values():
        lines.append(f"  {f.name:8s} towers: {', '.join(f.towers)}  (loads model_type {', '.join(f.model_types)})")
    lines.append("presets:")
    for f in FAMILIES.values():
        for p in f.presets.values():
            lines.append(f"  {p.name:16s} [{f.name}] {p.description}")
    lines.append("methods (intrinsic ones combine with '+', e.g. ln+attn):")
    for m in METHODS.values():
        lines.append(f"  {m.name:12s} {'intrinsic' if m.intrinsic else 'peft':9s} {m.description}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.models.params", description=__doc__)
    ap.add_argument("--model", help="preset, local HF model directory, Hub id (ORG/NAME[@revision]) or s3:// folder")
    ap.add_argument("--method", default="ln", help="method name (see --list)")
    ap.add_argument("--towers", default=None, help="comma-separated towers (default: all)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--list", action="store_true", help="list families, presets and methods")
    args = ap.parse_args(argv)
    if args.list:
        print(list_all())
        return 0
    if not args.model:
        ap.error("--model is required (or --list)")
    try:
        ref = resolve(args.model)
        device = "meta" if ref.preset is not None and ref.preset.meta_only else "cpu"
        model = load_model(ref, device=device)
        towers = args.towers.split(",") if args.towers else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns about norm layers in LN tuning
            _, acc = apply_method(model, ref, args.method, towers)
    except (ModelLoadError, MethodError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(acc.to_dict(), indent=2) if args.json else format_table(acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
