"""``python -m raymed.data {prepare,synth,inspect,formats}``: convert, generate and look at data.

Exit status: 0 on success, 1 when the input is bad (nothing written), 2 on wrong usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from raymed import storage
from raymed.data.readers import FORMATS, DataFormatError
from raymed.data.source import ReadOptions

# Format-specific flags: (argparse dest, ReadOptions field).
_FORMAT_FLAGS = {"lang": "--lang", "views": "--views", "source": "--source", "columns": "--columns",
                 "split": "--split", "task": "--task"}


def _columns(text: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise argparse.ArgumentTypeError(f"{item!r}: expected field=column, e.g. question=q,image=img_path")
        pairs[field.strip()] = column.strip()
    return pairs


def _input(text: str) -> Path | str:
    return text if text.startswith("hf://") else Path(text)


def _window(text: str) -> tuple[float, float]:
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CENTER,WIDTH, e.g. 40,400") from None
    if width < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the width must be at least 1")
    return center, width


def _parser() -> argparse.ArgumentParser:
    from raymed.data.prepare import VAL_FRACTION
    from raymed.data.synth import STYLES

    parser = argparse.ArgumentParser(prog="python -m raymed.data",
                                     description="Convert, generate and inspect raymed datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert a published dataset into Parquet shards + manifest.json")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="input format (see `formats`)")
    p.add_argument("--input", required=True, type=_input,
                   help="dataset folder or annotation file; format hf: also hf://datasets/ORG/NAME[@revision]")
    p.add_argument("--out", required=True, help="output folder or URI (s3://, gs://) for shards and manifest.json")
    p.add_argument("--on-bad", choices=("error", "skip"), default="error",
                   help="error (default): stop before writing anything; skip: write the rest, record skips")
    p.add_argument("--images", choices=("embed", "uri"), default="embed",
                   help="embed the compressed image bytes (default) or store their absolute path")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="rows per Parquet file (default 1000)")
    p.add_argument("--dataset", help="value of the dataset column (default: the format's name)")
    p.add_argument("--image-root", type=Path, help="folder that image paths are relative to")
    p.add_argument("--no-check-images", dest="check_images", action="store_false",
                   help="do not decode images to detect corrupt/truncated files (faster, riskier)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images for the check")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prepare output in --out")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help="when the source has no validation split: share of the train images (with all their "
                        "questions) carved into one, never an image also in test (default %(default)s; 0: none)")
    p.add_argument("--val-seed", type=int, default=0, help="seed of the carved validation split (default 0)")
    p.add_argument("--dicom-window", type=_window, metavar="CENTER,WIDTH",
                   help="DICOM images: this window instead of each file's own (e.g. 40,400 for CT soft tissue)")
    g = p.add_argument_group("format-specific options")
    g.add_argument("--lang", choices=("en", "zh", "all"), help="slake: question language (default en)")
    g.add_argument("--views", choices=("first", "all"), help="r2gen: first view per study (default) or all")
    g.add_argument("--source", choices=("auto", "splits", "public"),
                   help="vqa-rad: trainset/testset.json or the public release JSON (default auto)")
    g.add_argument("--columns", type=_columns, help="generic: field=column,... (fields: id, image, "
                   "question, answer, answer_type, split, task)")
    g.add_argument("--split", choices=("train", "val", "test"),
                   help="generic, llava, messages: split for rows without one")
    g.add_argument("--task", choices=("vqa", "report"), help="generic, hf: task for rows without one (default vqa; hf: report when there is no question column)")

    s = sub.add_parser("synth", help="generate the synthetic Med-VQA dataset (VQA-RAD or R2Gen layout)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--style", choices=sorted(STYLES), default="base")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--test-fraction", type=float, default=0.2)
    s.add_argument("--layout", choices=("vqa-rad", "r2gen"), default="vqa-rad")

    i = sub.add_parser("inspect", help="summarise a prepared folder and show a few rows")
    i.add_argument("data_dir", help="prepared folder or URI")
    i.add_argument("--rows", type=int, default=3, help="rows to show per split")

    sub.add_parser("formats", help="list input formats and synthetic styles")
    return parser


def _prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from raymed.data.prepare import prepare, summary

    allowed = FORMATS[args.format].options
    given = {name: getattr(args, name) for name in _FORMAT_FLAGS if getattr(args, name) is not None}
    wrong = [f"{_FORMAT_FLAGS[n]}" for n in given if n not in allowed]
    if wrong:
        users = {flag: [f for f, spec in FORMATS.items() if n in spec.options] for n, flag in _FORMAT_FLAGS.items()}
        parser.error("; ".join(f"{flag} applies to format {', '.join(users[flag])}, not {args.format}"
                               for flag in wrong))
    options = ReadOptions(dataset=args.dataset, image_root=args.image_root.resolve() if args.image_root else None,
                          dicom_window=args.dicom_window, **given)
    manifest = prepare(args.format, args.input, args.out, options=options, on_bad=args.on_bad, images=args.images,
                       rows_per_shard=args.rows_per_shard, check_images=args.check_images, workers=args.workers,
                       overwrite=args.overwrite, val_fraction=args.val_fraction, val_seed=args.val_seed)
    print(summary(manifest))
    print(f"wrote {storage.resolve(args.out)}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from raymed.data.synth import generate

    info = generate(args.out, n=args.n, seed=args.seed, style=args.style, size=args.size,
                    test_fraction=args.test_fraction, layout=args.layout)
    counts = ", ".join(f"{k} {v}" for k, v in info["rows"].items())
    print(f"synth style {args.style} seed {args.seed}: {args.n} images, rows: {counts} ({args.layout} layout)")
    print(f"wrote {args.out.resolve()}; read it with: python -m raymed.data prepare --format {args.layout} "
          f"--input {args.out} --out OUT --dataset synth-{args.style}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from raymed.data.prepare import read_manifest, summary

    manifest = read_manifest(args.data_dir)
    print(summary(manifest))
    for split, info in manifest["splits"].items():
        fs, path = storage.filesystem(storage.join(args.data_dir, split, info["shards"][0]["file"]))
        table = pq.read_table(path, filesystem=fs).slice(0, args.rows)
        for row in table.to_pylist():
            size = f"{len(row['image'])} B" if row["image"] is not None else row["image_uri"]
            answer = row["answer"][:60]
            print(f"  [{split}] {row['id']}: {row['question']!r} -> {answer!r} ({row['answer_type']}, {size})")
    return 0


def _formats() -> int:
    from raymed.data.synth import STYLES

    print("input formats (prepare --format):")
    for spec in FORMATS.values():
        opts = ", ".join(sorted(spec.options))
        print(f"  {spec.name:<8} {spec.summary}  [options: {opts}]")
    print("synthetic styles (synth --style):")
    for style in STYLES.values():
        print(f"  {style.name:<8} {style.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    from raymed.data.generic import GenericColumnsError
    from raymed.data.prepare import BadRowsError

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            return _prepare(args, parser)
        if args.command == "synth":
            return _synth(args)
        if args.command == "inspect":
            return _inspect(args)
        return _formats()
    except (BadRowsError, DataFormatError, GenericColumnsError, FileExistsError, FileNotFoundError, ValueError,
            storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
