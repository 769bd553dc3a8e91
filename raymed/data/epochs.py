"""A worker's training batches, epoch after epoch, in a seeded order per (seed, epoch).

Prepared shards keep their source order (SLAKE and VQA-RAD list an image's questions side by side), and Ray Data
hands a worker its shard in file order (`data.preserve_order`). :class:`EpochBatches` turns that fixed stream into
a fresh order every epoch:

- The stream is read in *windows* of at most `data.cache_mb` MiB of encoded rows. Each window's rows are permuted
  with a generator seeded by ``(seed, epoch, window)`` and cut into batches; rows short of a full batch carry over
  into the next window, so an epoch has the same number of batches however the stream is cut.
- A shard that fits in one window (the usual case: the encoded shard fits in memory) is kept after the first pass,
  and later epochs permute the kept rows with the same generator instead of streaming again (no Ray Data restart,
  no second decode). The order is the one streaming would have given: a run resumed at epoch ``e`` (whose worker
  starts with nothing kept) trains on exactly the batches an uninterrupted run trains on at epoch ``e``.
- Every row appears once per epoch. A larger shard is shuffled within each window only (a buffered shuffle, like
  Ray Data's local shuffle, but reproducible).

``group_by_length`` (`data.group_by_length`) then sorts each run of `GROUP_BATCHES` batches of that order by sample
length (the tokens the attention masks count) and shuffles the full batches with the same generator: batches of
similar lengths, so less padding, in an order still fixed by ``(seed, epoch, window)`` (the batch short of full stays
last, so the carry-over above is unchanged).

``shuffle=False`` keeps file order and streams batch by batch (how the shipped bases were pretrained: their rows
are pre-shuffled on disk). ``limit_mb=0`` never keeps the shard: every epoch streams, shuffled within windows of
`DEFAULT_WINDOW_MB`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

Batch = dict[str, Any]
DEFAULT_WINDOW_MB = 256
GROUP_BATCHES = 16  # batches sorted by length together (`group_by_length`)


class EpochBatches:
    """Training batches of one worker's shard (anything with Ray Data's ``iter_torch_batches``)."""

    def __init__(self, shard: Any, batch_size: int, limit_mb: int, log: Callable[[str], None] = print, *,
                 seed: int = 0, shuffle: bool = True, group_by_length: bool = False) -> None:
        self.shard, self.batch_size, self.log = shard, batch_size, log
        self.limit = (limit_mb or DEFAULT_WINDOW_MB) << 20
        self.seed, self.shuffle, self.group_by_length = seed, shuffle, group_by_length
        self.kept: Batch | None = None  # the whole shard's rows, once it was seen to fit in one window
        self.kept_mb = 0.0
        self.fits: bool | None = None if limit_mb > 0 else False

    @classmethod
    def in_memory(cls, rows: Batch, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                  group_by_length: bool = False) -> "EpochBatches":
        """A shard already in memory (all its rows in one batch dict): every epoch gives the batches a worker that
        kept this shard gives (benchmarks train a plain loop on the very batches of the recipe)."""
        out = cls(None, batch_size, 0, seed=seed, shuffle=shuffle, group_by_length=group_by_length)
        out.kept, out.kept_mb, out.fits = rows, _nbytes(rows) / 2**20, True
        return out

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of epoch ``epoch`` (0-based), in the order fixed by ``(seed, epoch)``."""
        if self.kept is not None:
            yield from self._batches(self.kept, self._order(epoch, 0, self.kept))
            return
        if not self.shuffle:
            yield from self._in_file_order()
            return
        window: list[Batch] = []
        size, index = 0, 0
        carry: Batch | None = None
        for batch in self._stream():
            window.append(batch)
            size += _nbytes(batch)
            if size > self.limit:
                if self.fits is None:
                    self.log(f"training shard exceeds data.cache_mb={self.limit >> 20}: streaming every epoch, "
                             "shuffled within windows of that size")
                self.fits = False
                rows = _concat(([carry] if carry else []) + window)
                full = _rows(rows) // self.batch_size * self.batch_size
                order = self._order(epoch, index, rows)
                yield from self._batches(rows, order[:full])
                carry = _take(rows, order[full:]) if full < len(order) else None
                window, size, index = [], 0, index + 1
        rows = _concat(([carry] if carry else []) + window) if (window or carry) else None
        if rows is None:
            return
        yield from self._batches(rows, self._order(epoch, index, rows))
        if self.fits is None and index == 0:  # the whole shard in one window: replay it from memory
            self.kept, self.kept_mb, self.fits = rows, _nbytes(rows) / 2**20, True
            self.log(f"{_rows(rows)} rows ({self.kept_mb:.1f} MiB) kept in memory for the next epochs")

    def _in_file_order(self) -> Iterator[Batch]:
        keep: list[Batch] | None = [] if self.fits is None else None
        size = 0
        for batch in self._stream():
            if keep is not None:
                size += _nbytes(batch)
                if size <= self.limit:
                    keep.append(batch)
                else:
                    keep = None
            yield batch
        if keep:  # a whole epoch seen and it fits: replay it from memory
            self.kept, self.kept_mb, self.fits = _concat(keep), size / 2**20, True
        elif self.fits is None:
            self.fits = False

    def _stream(self) -> Iterator[Batch]:
        from raymed.data.stream import torch_batches

        yield from torch_batches(self.shard, self.batch_size, drop_last=False)

    def _order(self, epoch: int, window: int, rows: Batch) -> np.ndarray:
        n = _rows(rows)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, epoch, window])
        order = rng.permutation(n)
        return _grouped(order, _lengths(rows), self.batch_size, rng) if self.group_by_length else order

    def _batches(self, rows: Batch, order: np.ndarray) -> Iterator[Batch]:
        for start in range(0, len(order), self.batch_size):
            yield _take(rows, order[start:start + self.batch_size])


def _lengths(rows: Batch) -> np.ndarray:
    """Each row's tokens: the ones of every attention mask the model reads (prompt, and MISS's answer decoder)."""
    masks = [rows[k] for k in ("attention_mask", "decoder_attention_mask") if isinstance(rows.get(k), torch.Tensor)]
    if not masks:
        raise ValueError("data.group_by_length: the batches have no attention_mask to measure lengths by")
    return sum(m.sum(dim=1) for m in masks).numpy()


def _grouped(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """``order`` cut into groups of `GROUP_BATCHES` batches, each group sorted by length (longest first; stable),
    then the full batches shuffled by ``rng``; the batch short of full (if any) stays last."""
    group = GROUP_BATCHES * batch_size
    ranked = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                             for chunk in np.split(order, range(group, len(order), group))])
    full = len(ranked) // batch_size * batch_size
    batches = ranked[:full].reshape(-1, batch_size)[rng.permutation(full // batch_size)]
    return np.concatenate([batches.reshape(-1), ranked[full:]])


def _rows(batch: Batch) -> int:
    value = next(iter(batch.values()))
    return int(value.shape[0]) if isinstance(value, torch.Tensor) else len(value)


def _nbytes(batch: Batch) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    out: Batch = {}
    for key, first in batches[0].items():
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat([b[key] for b in batches])
        else:
            out[key] = [x for b in batches for x in b[key]]
    return out


def _take(rows: Batch, index: np.ndarray) -> Batch:
    idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
    return {k: (v.index_select(0, idx) if isinstance(v, torch.Tensor) else [v[i] for i in index.tolist()])
            for k, v in rows.items()}
