"""Evaluation rows: read a split directly with pyarrow (eval sets are small), without Ray.

Rows are interleaved across ranks (``rank, rank + world_size, ...``) so no row is dropped, and each
batch keeps its ``id`` so that :func:`match_predictions` can pair predictions with :func:`references`.
(To evaluate through Ray Data instead, ``stream.encoded_split(..., keep=("id",))`` keeps ids too.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

from raymed import storage
from raymed.data.transform import DecodeAndEncode, EncoderFactory, shard_paths

TEXT_COLUMNS = ("id", "dataset", "split", "task", "question", "answer", "answer_type", "extra")


def read_rows(data_dir: Path | str, split: str, *, columns: Sequence[str] | None = None,
              rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
    """The rows of ``split`` for ``rank`` (rows ``rank, rank + world_size, ...``: none dropped)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    rows: list[dict[str, Any]] = []
    for path in shard_paths(data_dir, split):
        fs, inner = storage.filesystem(path)
        rows.extend(pq.read_table(inner, filesystem=fs, columns=list(columns) if columns else None).to_pylist())
    return rows[rank::world_size]


def references(data_dir: Path | str, split: str) -> dict[str, dict[str, Any]]:
    """id -> reference row (text columns only), for matching predictions to answers."""
    return {row["id"]: row for row in read_rows(data_dir, split, columns=TEXT_COLUMNS)}


def eval_batches(
    data_dir: Path | str,
    split: str,
    encoder_factory: EncoderFactory,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_image_side: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Encoded batches of this rank's eval rows, in-process (no Ray), each with its ``id`` array.

    ``encoder_factory`` is the same factory the training stream uses (``lambda: encoder`` works too).
    """
    transform = DecodeAndEncode(encoder_factory, max_image_side=max_image_side)
    rows = read_rows(data_dir, split, rank=rank, world_size=world_size)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield transform({key: [row[key] for row in chunk] for key in chunk[0]})


def match_predictions(predictions: Mapping[str, str], refs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Reference rows with a ``prediction`` added, in reference order; every id must match exactly."""
    missing = [i for i in refs if i not in predictions]
    unknown = [i for i in predictions if i not in refs]
    if missing or unknown:
        raise KeyError(
            f"predictions do not match references: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unknown)} unknown (e.g. {unknown[:3]})"
        )
    return [{**ref, "prediction": predictions[i]} for i, ref in refs.items()]
