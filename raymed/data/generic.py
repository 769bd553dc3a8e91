"""Generic input: JSONL, JSON, CSV or Parquet files with configurable column names.

``--input`` is one file or a folder (all ``*.jsonl``, ``*.json``, ``*.csv``, ``*.parquet`` below it,
in sorted order). Columns are found by their usual spellings (:data:`GENERIC_FIELDS`) unless
``--columns field=column,...`` names them. The image column may hold:

- a path, relative to ``--image-root`` (default: the file's folder), or absolute, or ``file://``;
- a remote URI (``s3://``, ``gs://``, ``https://``...), kept in ``image_uri`` and read in the stream;
- bytes, or a Hugging Face ``Image`` struct ``{bytes, path}`` (the bytes are kept as stored);
- a list of any of these: the first entry is used (and counted).

The split comes from a ``split`` column, else ``--split``, else the file name (``train*.parquet``,
``test.jsonl``...), else ``train``; the task from a ``task`` column, else ``--task``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from raymed.data.schema import TASKS, canonical_split, lookup
from raymed.data.source import ImageRef, ReadContext, SourceRow, build_row, find_image

GENERIC_FIELDS: dict[str, tuple[str, ...]] = {
    "id": ("id", "qid", "question_id"),
    "image": ("image", "image_path", "image_name", "img", "img_name", "image_uri", "file_name"),
    "question": ("question", "query"),
    "answer": ("answer", "report", "caption"),
    "answer_type": ("answer_type",),
    "split": ("split",),
    "task": ("task",),
}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_SPLIT_IN_NAME = re.compile(r"^(train|training|val|valid|validate|validation|dev|test|testing)(?![a-z])", re.I)


class GenericColumnsError(ValueError):
    """``--columns`` names an unknown field or a column the file does not have."""


def field_names(columns: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """The lookup table after ``--columns`` overrides; unknown fields are an error listing the known ones."""
    unknown = sorted(set(columns) - set(GENERIC_FIELDS))
    if unknown:
        raise GenericColumnsError(
            f"--columns: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(GENERIC_FIELDS)}"
        )
    return {**GENERIC_FIELDS, **{field: (column,) for field, column in columns.items()}}


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{root}: no {'/'.join(SUFFIXES)} files found")
    return files


def _read_file(path: Path) -> tuple[list[str] | None, Iterator[Any]]:
    """(column names when the format has a header, records)."""
    if path.suffix == ".parquet":
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names

        def batches() -> Iterator[Any]:
            for batch in parquet.iter_batches(batch_size=256):
                yield from batch.to_pylist()

        return names, batches()
    if path.suffix == ".csv":
        handle = path.open(newline="", encoding="utf-8-sig")
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), iter(reader)
    from raymed.data.readers import load_records  # local: readers imports this module

    return None, iter(load_records(path))


def _image(value: Any, dirs: list[Path], ctx: ReadContext) -> ImageRef:
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            ctx.norm.counts["image: list -> first entry"] += 1
        value = value[0] if value else None
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        if data:
            return ImageRef(ref=path or "<embedded>", data=bytes(data))
        value = path
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageRef(ref="<embedded>", data=bytes(value)) if len(value) else ImageRef(problem="empty image: 0 bytes")
    return find_image(value, dirs)


def read_generic(ctx: ReadContext) -> Iterator[SourceRow]:
    """Rows of generic JSONL/JSON/CSV/Parquet files (see the module docstring for the rules)."""
    opts = ctx.options
    fields = field_names(dict(opts.columns))
    for path in _files(ctx.root):
        header, records = _read_file(path)
        if header is not None:
            for field, column in opts.columns.items():
                if lookup(dict.fromkeys(header), column)[0] is None:
                    raise GenericColumnsError(
                        f"{path}: --columns {field}={column}: no such column; columns are: {', '.join(header)}"
                    )
        dirs = [opts.image_root] if opts.image_root else [path.parent]
        match = _SPLIT_IN_NAME.match(path.stem)
        file_split = opts.split or (match.group(1) if match else "train")
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                problem = "invalid record: not valid JSON" if record is None else "invalid record: not an object"
                yield SourceRow.invalid(ctx.rel(path), index, None, opts.task, problem)
                continue
            split_key, split_value = lookup(record, *fields["split"])
            raw_split = split_value if split_key is not None else file_split
            split = canonical_split(raw_split)
            task_key, task_value = lookup(record, *fields["task"])
            task = (ctx.norm.category(task_value, "task") if task_key is not None else None) or opts.task
            record = {k: v for k, v in record.items() if k not in (split_key, task_key)}
            row = build_row(
                ctx, record, file=ctx.rel(path), index=index, split=split, task=task if task in TASKS else "vqa",
                fields=fields, image=lambda ref: _image(ref, dirs, ctx),
                default_id=f"{path.stem}-{index}", split_note=f"{raw_split!r} (expected train, val or test)",
            )
            if task not in TASKS:
                row.problems.append(f"unknown task: {task!r} (expected one of {', '.join(TASKS)})")
            yield row
