"""Convert a published dataset into Parquet shards of the unified schema, plus ``manifest.json``.

Layout written: ``OUT/{split}/part-00000.parquet`` (at most ``rows_per_shard`` rows each) and
``OUT/manifest.json``. Shards are written into a hidden staging folder beside ``OUT`` and moved into
place only when the run succeeds, so a failed run (``--on-bad error``) leaves nothing behind.

Every prepared dataset has a ``val`` split to select on (docs/DESIGN.md, "Validation splits"): the source's own
(SLAKE ``validate.json``, PathVQA ``val``, R2Gen ``val``) or, when it ships none (VQA-RAD), one carved from
``train`` by image (``_Conversion.carve_val``): a seeded ``val_fraction`` of the train images, never an image
that is also in ``test``, with all of each image's questions. The manifest records how (``val_split``) and how
many images each pair of splits shares (``image_overlap``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymed.data.images import ImageChecker
from raymed.data.readers import get_format
from raymed.data.schema import SCHEMA, SCHEMA_VERSION, SPLITS
from raymed.data.dicom import dicom_png, is_dicom
from raymed.data.hf import is_hf_uri, local_folder
from raymed.data.source import ReadContext, ReadOptions, SourceRow

OnBad = Literal["error", "skip"]
ImageMode = Literal["embed", "uri"]
MANIFEST = "manifest.json"
VAL_FRACTION = 0.1  # share of the train images carved into `val` when the source ships no validation split
_CHUNK = 256  # rows whose images are checked together in the thread pool
_ROW_GROUP_BYTES = 32 << 20  # small row groups keep Ray Data blocks small


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be written: where it is and why."""

    file: str
    index: int
    id: str | None
    split: str | None
    reason: str

    def line(self) -> str:
        ident = f" (id {self.id!r})" if self.id is not None else ""
        return f"{self.file} row {self.index}{ident}: {self.reason}"

    def kinds(self) -> list[str]:
        """The reason categories (text before the first ':'), for the manifest's counts."""
        return [part.split(":", 1)[0].strip() for part in self.reason.split("; ")]


class BadRowsError(ValueError):
    """``--on-bad error`` found bad rows; nothing was written."""

    def __init__(self, bad: list[BadRow], source: Path, fmt: str, show: int = 10) -> None:
        self.bad, self.source, self.fmt, self.show = bad, source, fmt, show
        lines = [f"  {b.line()}" for b in bad[:show]]
        if len(bad) > show:
            lines.append(f"  ... and {len(bad) - show} more")
        super().__init__(
            f"{len(bad)} bad row(s) in {source} (format {fmt}); nothing was written.\n"
            + "\n".join(lines)
            + "\nFix these rows, or re-run with --on-bad skip to write the other rows"
            " and record the skipped ones in manifest.json."
        )

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from its fields, not its message (pickle, Ray)
        return type(self), (self.bad, self.source, self.fmt, self.show)


class ShardWriter:
    """Writes one split's rows to ``part-NNNNN.parquet`` files of at most ``rows_per_shard`` rows."""

    def __init__(self, directory: Path, rows_per_shard: int, row_group_rows: int) -> None:
        self.directory = directory
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = min(row_group_rows, rows_per_shard)
        self.shards: list[dict[str, Any]] = []
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0

    def add(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        self._buffer_bytes += len(row["image"] or b"")
        if len(self._buffer) >= self.row_group_rows or self._buffer_bytes >= _ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        while self._buffer:
            if self._writer is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                name = f"part-{len(self.shards):05d}.parquet"
                compression = {c: ("none" if c == "image" else "zstd") for c in SCHEMA.names}
                self._writer = pq.ParquetWriter(self.directory / name, SCHEMA, compression=compression,
                                                use_dictionary=[c for c in SCHEMA.names if c != "image"])
                self.shards.append({"file": name, "rows": 0})
            take = min(len(self._buffer), self.rows_per_shard - self._rows_in_shard)
            rows, self._buffer = self._buffer[:take], self._buffer[take:]
            self._writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
            self._rows_in_shard += take
            self.shards[-1]["rows"] += take
            if self._rows_in_shard >= self.rows_per_shard:
                self._writer.close()
                self._writer, self._rows_in_shard = None, 0
        self._buffer_bytes = 0

    def abort(self) -> None:
        """Close an open file without flushing (the staging folder is removed after)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _options_dict(options: ReadOptions) -> dict[str, Any]:
    """The options that differ from the defaults, JSON-ready."""
    default = ReadOptions()
    out = {}
    for f in fields(options):
        value = getattr(options, f.name)
        if value != getattr(default, f.name):
            out[f.name] = str(value) if isinstance(value, Path) else dict(value) if f.name == "columns" else value
    return out


def _chunks(rows: Iterable[SourceRow], size: int) -> Iterable[list[SourceRow]]:
    chunk: list[SourceRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Conversion:
    """One prepare run's state: checks rows, writes the good ones to shards, counts everything."""

    def __init__(self, dataset: str, ctx: ReadContext, checker: ImageChecker, staging: Path, *, images: ImageMode,
                 rows_per_shard: int, row_group_rows: int) -> None:
        self.dataset, self.ctx, self.checker, self.staging = dataset, ctx, checker, staging
        self.embed = images == "embed"
        self.rows_per_shard, self.row_group_rows = rows_per_shard, row_group_rows
        self.writers: dict[str, ShardWriter] = {}
        self.seen: dict[tuple[str, str], str] = {}  # (split, id) -> where it was first seen
        self.stats: dict[str, Counter[str]] = defaultdict(Counter)
        self.split_images: dict[str, set[str]] = defaultdict(set)
        self.image_of: dict[tuple[str, str], str] = {}  # (split, id) -> image key (path, URI or content hash)
        self.image_stats: Counter[str] = Counter()
        self.val_split: dict[str, Any] = {}

    def problems(self, row: SourceRow) -> list[str]:
        """Why ``row`` cannot be written: the reader's problems, its image's, a duplicate id."""
        problems = list(row.problems)
        image = row.image
        if image.problem:
            problems.append(image.problem)
        elif image.path is not None and (problem := self.checker.problem(image.path)):
            problems.append(f"{problem}: {self.ctx.rel(image.path)}")
        elif image.data is not None and (problem := self.checker.check_bytes(image.data)):
            problems.append(f"{problem}: {image.ref}")
        key = (row.split or "", row.id or "")
        if row.id is not None and key in self.seen:
            problems.append(f"duplicate id: also at {self.seen[key]} in split {row.split}")
        elif not problems:
            self.seen[key] = f"{row.file} row {row.index}"
        return problems

    def write(self, row: SourceRow) -> None:
        """Append a good row to its split's shards (image bytes embedded, or its path/URI)."""
        assert row.split is not None and row.id is not None
        image = row.image
        if image.data is not None:
            data, uri, image_key = image.data, None, hashlib.blake2b(image.data, digest_size=16).hexdigest()
        elif image.path is not None:
            data = image.path.read_bytes() if self.embed else None
            uri, image_key = (None if self.embed else str(image.path)), str(image.path)
        elif image.text_only:  # no image on purpose: no bytes, no URI; its own group for the val carve-out
            data, uri, image_key = None, None, f"text-only:{row.id}"
        else:
            data, uri, image_key = None, image.uri, str(image.uri)
            self.image_stats["remote_unchecked"] += 1
        if data is not None and is_dicom(data):  # embedded as the 8-bit PNG the model would see
            data = dicom_png(data, self.ctx.options.dicom_window)
            self.image_stats["dicom_converted"] += 1
        self.image_stats["text_only" if image.text_only else "embedded" if data is not None else "uri"] += 1
        self.add(row.split, image_key, {
            "id": row.id, "dataset": self.dataset, "split": row.split, "task": row.task, "image": data,
            "image_uri": uri, "question": row.question, "answer": row.answer, "answer_type": row.answer_type,
            "extra": row.extra,
        })

    def add(self, split: str, image_key: str, record: dict[str, Any]) -> None:
        """Write one unified record to ``split``'s shards and count it."""
        self.split_images[split].add(image_key)
        self.image_of[(split, record["id"])] = image_key
        writer = self.writers.get(split)
        if writer is None:
            writer = ShardWriter(self.staging / split, self.rows_per_shard, self.row_group_rows)
            self.writers[split] = writer
        writer.add(record)
        counts = self.stats[split]
        counts["rows"] += 1
        counts[f"answer_type.{record['answer_type']}"] += 1
        counts[f"task.{record['task']}"] += 1

    def close(self, val_fraction: float, val_seed: int) -> None:
        """Finish every split's shards, ``val`` included (:meth:`carve_val`)."""
        for writer in self.writers.values():
            writer.close()
        self.carve_val(val_fraction, val_seed)
        for writer in self.writers.values():
            writer.close()

    def carve_val(self, fraction: float, seed: int) -> None:
        """Give the dataset a ``val`` split: the source's own, else a seeded ``fraction`` of the train images (none
        that is also in ``test``) moved from ``train`` with all their rows. Call with every writer closed."""
        if "val" in self.writers:
            self.val_split = {"source": "dataset"}
            return
        train = sorted(self.split_images.get("train", ()))
        pool = [key for key in train if key not in self.split_images.get("test", ())]
        count = min(val_images(len(train), fraction), len(pool))
        self.val_split = {"source": "carved", "by": "image", "fraction": fraction, "seed": seed,
                          "train_images": len(train), "in_test": len(train) - len(pool), "images": count}
        if count == 0:
            reason = ("--val-fraction 0" if fraction == 0 else "no train split" if not train
                      else "every train image is also in test" if not pool else "fewer than 2 train images")
            self.val_split = {"source": "none", "reason": reason}
            return
        chosen = {pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:count]}
        uncarved = self.staging / ".train-uncarved"
        (self.staging / "train").rename(uncarved)
        shards = self.writers.pop("train").shards
        del self.stats["train"], self.split_images["train"]
        for shard in shards:  # file order kept within train and val
            for batch in pq.ParquetFile(uncarved / shard["file"]).iter_batches(batch_size=self.row_group_rows):
                for record in batch.to_pylist():
                    key = self.image_of[("train", record["id"])]
                    split = "val" if key in chosen else "train"
                    self.add(split, key, {**record, "split": split})
        shutil.rmtree(uncarved)

    def manifest(self, head: dict[str, Any], rows_read: int, bad: list[BadRow]) -> dict[str, Any]:
        splits = {}
        for split in sorted(self.writers, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s)):
            c = self.stats[split]
            splits[split] = {
                "rows": c["rows"],
                "answer_type": {t: c[f"answer_type.{t}"] for t in ("closed", "open")},
                "task": {k.split(".", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("task.")},
                "images": len(self.split_images[split]),
                "shards": self.writers[split].shards,
            }
        reasons: Counter[str] = Counter(kind for b in bad for kind in b.kinds())
        return {
            "schema_version": SCHEMA_VERSION,
            **head,
            "rows_read": rows_read,
            "rows": sum(s["rows"] for s in splits.values()),
            "splits": splits,
            "val_split": self.val_split,
            "image_overlap": image_overlap(self.split_images),
            "images": {
                "unique": len({k for k in set().union(*self.split_images.values()) if not k.startswith("text-only:")}),
                "files_checked": self.checker.files_checked,
                "decoded_check": self.checker.check,
                **{k: self.image_stats[k] for k in ("embedded", "uri", "remote_unchecked", "text_only")},
            },
            "normalised": dict(sorted(self.ctx.norm.counts.items())),
            "filtered": dict(sorted(self.ctx.filtered.items())),
            "skipped": {"count": len(bad), "by_reason": dict(sorted(reasons.items())),
                        "rows": [asdict(b) for b in bad]},
        }


def val_images(train_images: int, fraction: float) -> int:
    """Images to carve into ``val`` from ``train_images``: ``fraction`` of them, rounded, at least one when the
    fraction is not 0, and never all of them."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or train_images < 2:
        return 0
    return min(train_images - 1, max(1, round(train_images * fraction)))


def image_overlap(split_images: dict[str, set[str]]) -> dict[str, int]:
    """Images shared by each pair of splits (``train-test``, ``train-val``, ``val-test``): an image in two splits
    lets a model see at training time what it is scored on."""
    names = sorted(split_images, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    return {f"{a}-{b}": len(split_images[a] & split_images[b]) for a, b in itertools.combinations(names, 2)}


def _check_out(out: Any, not_empty: bool, prepared: Callable[[], bool], overwrite: bool) -> None:
    """``--out`` must be empty, or an earlier prepare output replaced with ``--overwrite``."""
    if not_empty and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    if not_empty and not prepared():
        raise FileExistsError(f"--out {out} is not a prepared dataset (no {MANIFEST}); refusing to overwrite it")


def prepare(
    fmt: str,
    source: Path | str,
    out: Path | str,
    *,
    options: ReadOptions = ReadOptions(),
    on_bad: OnBad = "error",
    images: ImageMode = "embed",
    rows_per_shard: int = 1000,
    row_group_rows: int = 256,
    check_images: bool = True,
    workers: int = 2,
    overwrite: bool = False,
    val_fraction: float = VAL_FRACTION,
    val_seed: int = 0,
) -> dict[str, Any]:
    """Read ``source`` in format ``fmt``, check every row and image, write shards; return the manifest.

    ``images="embed"`` stores the image file bytes as stored; ``"uri"`` stores the absolute path in
    ``image_uri`` instead (the stream then reads it). Raises :class:`BadRowsError` (nothing written)
    when ``on_bad == "error"`` and any row is bad. A source without a validation split gets one carved from
    ``train`` (``val_fraction`` of its images, seeded by ``val_seed``; 0: none).
    """
    from raymed import storage

    val_images(2, val_fraction)  # a wrong fraction fails before anything is read

    if storage.is_uri(out):  # prepare locally, then upload (manifest last: no half-written dataset)
        storage.check(out, "--out")
        _check_out(out, bool(storage.listdir(out)), lambda: storage.is_file(storage.join(out, MANIFEST)), overwrite)
        with storage.staged_output(out, last=(MANIFEST,)) as local:
            manifest = prepare(fmt, source, local, options=options, on_bad=on_bad, images=images,
                               rows_per_shard=rows_per_shard, row_group_rows=row_group_rows,
                               check_images=check_images, workers=workers, val_fraction=val_fraction,
                               val_seed=val_seed)
            storage.remove(out)  # --overwrite: no stale shards of the earlier dataset
        return manifest
    spec = get_format(fmt)
    source = local_folder(source) if is_hf_uri(source) else source  # hf://datasets/...: its Hub-cache snapshot
    source, out = Path(source).resolve(), Path(out).resolve()
    if not source.exists():
        raise FileNotFoundError(f"--input {source} does not exist")
    _check_out(out, out.exists() and any(out.iterdir()), (out / MANIFEST).is_file, overwrite)
    ctx = ReadContext(root=source, options=options)
    checker = ImageChecker(check=check_images, workers=workers)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    dataset = options.dataset or spec.dataset
    run = _Conversion(dataset, ctx, checker, staging, images=images, rows_per_shard=rows_per_shard,
                      row_group_rows=row_group_rows)
    bad: list[BadRow] = []
    rows_read = 0
    try:
        for chunk in _chunks(spec.read(ctx), _CHUNK):
            checker.prefetch(r.image.path for r in chunk if r.image.path is not None and not r.problems)
            for row in chunk:
                rows_read += 1
                problems = run.problems(row)
                if problems:
                    bad.append(BadRow(row.file, row.index, row.id, row.split, "; ".join(problems)))
                elif not (on_bad == "error" and bad):  # after a bad row in error mode: only count
                    run.write(row)
        if rows_read == 0:
            raise ValueError(f"{source}: no rows found for format {fmt} (filtered: {dict(ctx.filtered) or 'none'})")
        if bad and on_bad == "error":
            raise BadRowsError(bad, source, fmt)
        run.close(val_fraction, val_seed)
        head = {"format": spec.name, "dataset": dataset, "source": str(source),
                "options": {**_options_dict(options), "on_bad": on_bad, "images": images}}
        manifest = run.manifest(head, rows_read, bad)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)  # an empty folder, or an earlier prepare output with --overwrite
        staging.rename(out)
        return manifest
    finally:
        for writer in run.writers.values():
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)


def read_manifest(data_dir: Path | str) -> dict[str, Any]:
    """The ``manifest.json`` of a prepared folder; a clear error when the folder was not prepared."""
    from raymed import storage

    path = storage.join(data_dir, MANIFEST)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path} not found: is {data_dir} the --out of `python -m raymed.data prepare`?")
    return storage.read_json(path)


def summary(manifest: dict[str, Any]) -> str:
    """A few human-readable lines about a prepared dataset."""
    lines = [f"{manifest['dataset']} ({manifest['format']}): {manifest['rows']} rows from {manifest['source']}"]
    for name, s in manifest["splits"].items():
        at = s["answer_type"]
        lines.append(f"  {name:<5} {s['rows']:>7} rows  closed {at['closed']:>6}  open {at['open']:>6}"
                     f"  images {s['images']:>6}  shards {len(s['shards'])}")
    val = manifest.get("val_split") or {}
    if val.get("source") == "carved":
        kept = f"; {val['in_test']} train images also in test stay in train" if val["in_test"] else ""
        lines.append(f"  val carved from train by image: {val['images']} of {val['train_images']} train images "
                     f"(fraction {val['fraction']}, seed {val['seed']}{kept})")
    elif val.get("source") == "none":
        lines.append(f"  no val split: {val['reason']}")
    shared = {k: v for k, v in (manifest.get("image_overlap") or {}).items() if v}
    if shared:
        lines.append("  images in two splits: " + ", ".join(f"{k} {v}" for k, v in shared.items()))
    skipped = manifest["skipped"]
    if skipped["count"]:
        reasons = ", ".join(f"{k} {v}" for k, v in skipped["by_reason"].items())
        lines.append(f"  skipped {skipped['count']} row(s): {reasons} (listed in manifest.json)")
    if manifest["normalised"]:
        lines.append("  normalised: " + ", ".join(f"{k} ×{v}" for k, v in manifest["normalised"].items()))
    if manifest["filtered"]:
        lines.append("  filtered: " + ", ".join(f"{k} ×{v}" for k, v in manifest["filtered"].items()))
    return "\n".join(lines)
