"""The unified row schema of raymed's Parquet shards, and the normalisation of dirty source values.

Every reader turns its published format into rows of :data:`SCHEMA`. Images stay compressed
(the file bytes exactly as stored) or are referenced by ``image_uri``; they are decoded late, in
the Ray Data stream (:mod:`raymed.data.stream`).

Real files are dirty (docs/DESIGN.md §3): ids stored as numbers, answers stored as integers, categorical
fields with stray spaces or odd case. :class:`Normaliser` fixes these and counts every fix, so the
manifest says what was changed and nothing is changed silently.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Final

import pyarrow as pa

SCHEMA_VERSION: Final = 1

TASKS: Final = ("vqa", "report")
ANSWER_TYPES: Final = ("open", "closed")
SPLITS: Final = ("train", "val", "test")

SCHEMA: Final = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=True),
        pa.field("image_uri", pa.string(), nullable=True),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("answer_type", pa.string(), nullable=False),
        pa.field("extra", pa.string(), nullable=False),
    ],
    metadata={"raymed.schema_version": str(SCHEMA_VERSION)},
)
"""Columns: ``id`` unique per split; ``task`` in :data:`TASKS`; ``image`` compressed bytes or null;
``image_uri`` a path/URI when bytes are not embedded; ``question`` empty for report rows; ``answer``
the report text for report rows; ``answer_type`` in :data:`ANSWER_TYPES`; ``extra`` a JSON object
with the source's other fields."""

COLUMNS: Final = tuple(SCHEMA.names)

# Split spellings seen in published copies -> canonical split.
_SPLIT_ALIASES: Final = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_YES_NO: Final = frozenset({"yes", "no"})


def canonical_split(value: Any) -> str | None:
    """Map a split spelling (``validate``, ``Validation``, ``test ``) to train/val/test, else None."""
    if value is None:
        return None
    return _SPLIT_ALIASES.get(str(value).strip().lower())


def is_missing(value: Any) -> bool:
    """True for None, NaN and blank strings: the ways a source leaves a field empty."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _number_text(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Normaliser:
    """Normalises source values and counts each kind of fix (for the manifest's ``normalised``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def text(self, value: Any, field: str) -> str | None:
        """A free-text value (question, answer, report): numbers -> str, surrounding space stripped.

        Returns None when the value is missing, so the caller can report the row.
        """
        if is_missing(value):
            return None
        if isinstance(value, bool):
            self.counts[f"{field}: bool -> yes/no"] += 1
            return "yes" if value else "no"
        if isinstance(value, (int, float)):
            self.counts[f"{field}: number -> str"] += 1
            return _number_text(value)
        if not isinstance(value, str):
            self.counts[f"{field}: {type(value).__name__} -> str"] += 1
            value = str(value)
        stripped = value.strip()
        if stripped != value:
            self.counts[f"{field}: stripped whitespace"] += 1
        return stripped

    def ident(self, value: Any) -> str | None:
        """An id as a string (``12``, ``12.0`` and ``" 12"`` all become ``"12"``)."""
        if is_missing(value):
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.counts["id: number -> str"] += 1
            return _number_text(value)
        text = str(value).strip()
        if text != value:
            self.counts["id: stripped whitespace"] += 1
        return text

    def category(self, value: Any, field: str) -> str | None:
        """A categorical value stripped and lower-cased (``"CLOSED "`` -> ``"closed"``)."""
        if is_missing(value):
            return None
        text = _number_text(value) if isinstance(value, (int, float)) else str(value)
        stripped = text.strip()
        if stripped != text:
            self.counts[f"{field}: stripped whitespace"] += 1
        if stripped.lower() != stripped:
            self.counts[f"{field}: lower-cased"] += 1
        return stripped.lower()

    def answer_type(self, value: Any, answer: str | None, *, yes_no_closed: bool = False) -> str:
        """``open``/``closed`` from the source's value; inferred from the answer when absent or unknown.

        With ``yes_no_closed`` (PathVQA) the answer decides: yes/no -> closed, anything else -> open.
        """
        inferred = "closed" if answer is not None and answer.lower() in _YES_NO else "open"
        if yes_no_closed:
            return inferred
        norm = self.category(value, "answer_type")
        if norm in ANSWER_TYPES:
            return norm
        self.counts[f"answer_type: {'missing' if norm is None else repr(norm)} -> inferred"] += 1
        return inferred

    def extra(self, record: dict[str, Any], used: set[str], categorical: tuple[str, ...] = ()) -> str:
        """The source fields not mapped to a column, as a JSON object; ``categorical`` keys normalised."""
        out: dict[str, Any] = {}
        for key, value in record.items():
            if key in used:
                continue
            if key in categorical:
                value = self.category(value, key)
            elif isinstance(value, float) and math.isnan(value):
                value = None
            elif isinstance(value, bytes):
                continue  # binary payloads never go into the JSON side channel
            out[str(key)] = value
        return json.dumps(out, sort_keys=True, ensure_ascii=False, default=str)


_KEY_CLEAN = re.compile(r"[\s\-]+")


def clean_key(key: str) -> str:
    """Key spelling used for lookup: ``"Image Name"``, ``image-name``, ``IMAGE_NAME`` -> ``image_name``."""
    return _KEY_CLEAN.sub("_", str(key).strip().lower())


def lookup(record: dict[str, Any], *names: str) -> tuple[str | None, Any]:
    """First of ``names`` present in ``record`` (spelling-insensitive): (source key, value) or (None, None)."""
    cleaned = {clean_key(k): k for k in record}
    for name in names:
        key = cleaned.get(clean_key(name))
        if key is not None:
            return key, record[key]
    return None, None


def empty_table() -> pa.Table:
    """A zero-row table with :data:`SCHEMA`."""
    return SCHEMA.empty_table()
