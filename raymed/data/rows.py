"""The rows of a prepared split, read in-process with pyarrow (no Ray): eval sets, `raymed.eval`, the benchmarks.

Rows can be interleaved across ranks (``rank, rank + world_size, ...``) so that none is dropped. Training rows
stream through Ray Data instead (`raymed.data.stream`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pyarrow.parquet as pq

from raymed import storage
from raymed.data.transform import shard_paths


def read_split_rows(data_dir: Path | str, split: str, *, columns: Sequence[str] | None = None,
              rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
    """The rows of ``split`` for ``rank`` (rows ``rank, rank + world_size, ...``: none dropped)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    rows: list[dict[str, Any]] = []
    for path in shard_paths(data_dir, split):
        fs, inner = storage.filesystem(path)
        rows.extend(pq.read_table(inner, filesystem=fs, columns=list(columns) if columns else None).to_pylist())
    return rows[rank::world_size]
