"""Readers for the published Med-VQA and report-generation formats, and the format registry.

Each reader takes a :class:`ReadContext` (input root + options) and yields :class:`SourceRow`s.
Accepted layouts (``--input`` is the dataset folder, or one of its JSON files):

- ``vqa-rad``: ``trainset.json``/``testset.json`` (split from the file) or ``VQA_RAD Dataset
  Public.json`` (split from ``phrase_type``: freeform/para -> train, test_freeform/test_para ->
  test); images in ``VQA_RAD Image Folder/`` or ``images/``. Split files win when both exist
  (``--source`` chooses).
- ``slake``: ``train.json``, ``validate.json``, ``test.json``; images ``imgs/xmlabN/source.jpg``
  (``img_name`` is relative to ``imgs/``). English only unless ``--lang zh|all``.
- ``pathvqa``: ``{train,val,test}.jsonl`` or ``.json`` (a JSON list) with ``image``, ``question``,
  ``answer`` and optionally ``id``; ``image`` is relative to ``images/{split}/``, ``images/`` or the
  folder, with or without extension (``.jpg``/``.jpeg``/``.png`` tried). yes/no answers are closed,
  all others open; rows without an id get ``{split}-{row}``.
- ``r2gen``: R2Gen ``annotation.json`` = ``{train|val|test: [{id, report, image_path: [..]}]}``
  (IU-Xray, MIMIC-CXR); images under ``images/``. ``--views first`` (default) keeps the first view
  of each study, ``--views all`` writes one row per view with id ``{id}/{k}``.
- ``generic``: see :mod:`raymed.data.generic`. Hugging Face Parquet copies (e.g. of VQA-RAD or
  PathVQA, with an ``image`` struct of bytes) read as ``generic``: the split comes from the file name
  and, without an ``answer_type`` column, yes/no answers are closed and all others open.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from raymed.data.conversations import read_llava, read_messages
from raymed.data.generic import read_generic
from raymed.data.hf import read_hf
from raymed.data.schema import canonical_split
from raymed.data.source import (
    IMAGE_SUFFIXES,
    ReadContext,
    SourceRow,
    build_row,
    find_image,
)


class DataFormatError(ValueError):
    """The input as a whole does not match the format (missing files, invalid JSON, wrong shape)."""


def load_json(path: Path) -> Any:
    """Parse a JSON file; invalid JSON names the file, line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err


def load_records(path: Path) -> list[Any]:
    """A JSON list of records, or JSON Lines (one record per line; a bad line becomes a None record)."""
    if path.suffix == ".jsonl":
        records: list[Any] = []
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    records.append(None)
        return records
    data = load_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def image_dirs(ctx: ReadContext, base: Path, names: tuple[str, ...]) -> list[Path]:
    """Where images are looked for: ``--image-root`` if given, else the existing ``names`` under ``base``."""
    if ctx.options.image_root is not None:
        return [ctx.options.image_root]
    found = [base / name for name in names if (base / name).is_dir()]
    return found or [base]


def _records(
    ctx: ReadContext, path: Path, split: str | None, make_row: Callable[..., SourceRow]
) -> Iterator[SourceRow]:
    """Rows of one record file; non-object records become rows with a problem."""
    for index, record in enumerate(load_records(path)):
        if not isinstance(record, dict):
            kind = "not valid JSON" if record is None else f"a {type(record).__name__}, not an object"
            yield SourceRow.invalid(ctx.rel(path), index, split, "vqa", f"invalid record: {kind}")
            continue
        yield make_row(record, file=ctx.rel(path), index=index, split=split)


# --- VQA-RAD -------------------------------------------------------------------------------------

VQA_RAD_PUBLIC = "VQA_RAD Dataset Public.json"
VQA_RAD_SPLIT_FILES = {"trainset.json": "train", "testset.json": "test"}
PHRASE_TYPE_SPLIT = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}
VQA_RAD_CATEGORICAL = (
    "image_organ", "question_type", "phrase_type", "evaluation", "question_relation", "question_frame",
)


def _vqa_rad_files(ctx: ReadContext) -> list[tuple[Path, str | None]]:
    root, source = ctx.root, ctx.options.source
    if root.is_file():
        return [(root, VQA_RAD_SPLIT_FILES.get(root.name))]
    splits = [(root / name, split) for name, split in VQA_RAD_SPLIT_FILES.items() if (root / name).is_file()]
    public = root / VQA_RAD_PUBLIC
    if source == "splits" or (source == "auto" and splits):
        if not splits:
            raise DataFormatError(f"{root}: --source splits but no trainset.json/testset.json here")
        return splits
    if public.is_file():
        return [(public, None)]
    raise DataFormatError(
        f"{root}: no VQA-RAD annotations found; expected trainset.json/testset.json or '{VQA_RAD_PUBLIC}'"
    )


def read_vqa_rad(ctx: ReadContext) -> Iterator[SourceRow]:
    """VQA-RAD from its split files or the public release JSON (split from ``phrase_type``)."""
    base = ctx.root.parent if ctx.root.is_file() else ctx.root
    dirs = image_dirs(ctx, base, ("VQA_RAD Image Folder", "images"))
    for path, file_split in _vqa_rad_files(ctx):

        def make_row(record: dict[str, Any], **where: Any) -> SourceRow:
            split, note = where.pop("split"), "expected train or test"
            if split is None:  # public release: the split is encoded in phrase_type
                phrase = ctx.norm.category(record.get("phrase_type"), "phrase_type")
                split = PHRASE_TYPE_SPLIT.get(phrase or "")
                note = f"phrase_type {phrase!r} (expected one of {', '.join(PHRASE_TYPE_SPLIT)})"
            return build_row(
                ctx, record, split=split, image=lambda ref: find_image(ref, dirs),
                categorical=VQA_RAD_CATEGORICAL, split_note=note, **where,
            )

        yield from _records(ctx, path, file_split, make_row)


# --- SLAKE ---------------------------------------------------------------------------------------

SLAKE_FILES = {"train.json": "train", "validate.json": "val", "val.json": "val", "test.json": "test"}
SLAKE_CATEGORICAL = ("q_lang", "content_type", "modality", "location", "base_type")


def read_slake(ctx: ReadContext) -> Iterator[SourceRow]:
    """SLAKE; only ``q_lang == --lang`` rows (English by default), the others counted as filtered."""
    root = ctx.root
    base = root.parent if root.is_file() else root
    if root.is_file():
        files = [(root, canonical_split(root.stem))]
    else:
        files = [(root / name, split) for name, split in SLAKE_FILES.items() if (root / name).is_file()]
        if not files:
            raise DataFormatError(f"{root}: no SLAKE annotations found; expected train.json, validate.json, test.json")
    dirs = image_dirs(ctx, base, ("imgs", "images"))
    lang = ctx.options.lang
    for path, split in files:

        def make_row(record: dict[str, Any], **where: Any) -> SourceRow:
            return build_row(ctx, record, image=lambda ref: find_image(ref, dirs), categorical=SLAKE_CATEGORICAL,
                             **where)

        for row in _records(ctx, path, split, make_row):
            row_lang = json.loads(row.extra).get("q_lang")
            if lang != "all" and row_lang is not None and row_lang != lang:
                ctx.filtered[f"q_lang={row_lang} (--lang {lang})"] += 1
                continue
            yield row


# --- PathVQA -------------------------------------------------------------------------------------


def read_pathvqa(ctx: ReadContext) -> Iterator[SourceRow]:
    """PathVQA as ``{split}.jsonl``/``{split}.json`` + images; yes/no answers closed, others open."""
    root = ctx.root
    if root.is_file():
        files = [(root, canonical_split(root.stem))]
        base = root.parent
    else:
        base = root
        files = sorted(
            (p, canonical_split(p.stem))
            for p in root.iterdir()
            if p.suffix in (".json", ".jsonl") and canonical_split(p.stem) is not None
        )
        if not files:
            raise DataFormatError(f"{root}: no PathVQA annotations found; expected train/val/test .jsonl or .json")
    for path, split in files:
        dirs = image_dirs(ctx, base, (f"images/{split}", "images", "."))

        def make_row(record: dict[str, Any], **where: Any) -> SourceRow:
            return build_row(
                ctx, record, image=lambda ref: find_image(ref, dirs, IMAGE_SUFFIXES), yes_no_closed=True,
                default_id=f"{where['split']}-{where['index']}", **where,
            )

        yield from _records(ctx, path, split, make_row)


# --- R2Gen (IU-Xray, MIMIC-CXR) ------------------------------------------------------------------

R2GEN_FIELDS = {"id": ("id",), "answer": ("report", "findings"), "image": ("image_path",)}


def read_r2gen(ctx: ReadContext) -> Iterator[SourceRow]:
    """R2Gen ``annotation.json``; one row per study (first view) or per view (``--views all``)."""
    path = ctx.root if ctx.root.is_file() else ctx.root / "annotation.json"
    if not path.is_file():
        raise DataFormatError(f"{ctx.root}: no annotation.json (R2Gen format) found")
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected an object {{train|val|test: [...]}}, got {type(data).__name__}")
    dirs = image_dirs(ctx, path.parent, ("images",))
    all_views = ctx.options.views == "all"
    for key, entries in data.items():
        split = canonical_split(key)
        if split is None or not isinstance(entries, list):
            ctx.filtered[f"top-level key {key!r} (not a split)"] += 1
            continue
        file = f"{ctx.rel(path)}:{key}"
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                yield SourceRow.invalid(file, index, split, "report", "invalid record: not an object")
                continue
            views = entry.get("image_path")
            views = [views] if isinstance(views, str) else list(views or [])
            picked = range(len(views)) if all_views else range(min(1, len(views)))
            for k in picked or [None]:
                record = {**entry, "image_path": views[k] if k is not None else None, "views": views}
                if all_views:
                    record["view"] = k
                row = build_row(
                    ctx, record, file=file, index=index, split=split, task="report", fields=R2GEN_FIELDS,
                    image=lambda ref: find_image(ref, dirs),
                )
                if all_views and row.id is not None:
                    row.id = f"{row.id}/{k}"
                yield row


# --- registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """A registered input format: its reader, default dataset name and the options it uses."""

    name: str
    read: Callable[[ReadContext], Iterator[SourceRow]]
    dataset: str
    summary: str
    options: frozenset[str] = frozenset()


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("vqa-rad", read_vqa_rad, "vqa-rad", "VQA-RAD: trainset/testset.json or the public release JSON",
               frozenset({"source", "image_root"})),
        Format("slake", read_slake, "slake", "SLAKE: train/validate/test.json + imgs/",
               frozenset({"lang", "image_root"})),
        Format("pathvqa", read_pathvqa, "pathvqa", "PathVQA: {split}.jsonl|json + images/", frozenset({"image_root"})),
        Format("r2gen", read_r2gen, "r2gen", "IU-Xray / MIMIC-CXR report generation: R2Gen annotation.json",
               frozenset({"views", "image_root"})),
        Format("llava", read_llava, "llava", "LLaVA / LLaVA-Med conversation JSON (id, image, conversations)",
               frozenset({"split", "image_root"})),
        Format("messages", read_messages, "messages", "LLaMA-Factory messages + images JSON/JSONL",
               frozenset({"split", "image_root"})),
        Format("hf", read_hf, "hf", "Hugging Face dataset: hf://datasets/ORG/NAME[@rev] or its local folder",
               frozenset({"columns", "task", "image_root"})),
        Format("generic", read_generic, "generic", "JSONL/CSV/Parquet with configurable columns",
               frozenset({"columns", "split", "task", "image_root"})),
    )
}


def get_format(name: str) -> Format:
    """The registered format ``name``; unknown names list the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown data format {name!r}; known formats: {', '.join(FORMATS)}") from None
