"""Pad to the batch, not to the limit: cut a batch's all-padding columns before it reaches the model.

The stream encodes every row to `data.max_length` columns (Ray Data stacks equal-width arrays into blocks); the
model sees each batch cut to its longest sample, rounded up to a multiple of `data.pad_to_multiple_of` (tensor
cores). `data.max_length` is then a truncation limit only: compute follows the data, not the limit.

A column group is the arrays that share one mask (`attention_mask` for the prompt, `decoder_attention_mask` for
BLIP's answer decoder); the cut keeps the span of columns any row uses, on the side the group is padded (right for
training, left for LLaVA's generation prompts). Pure torch/numpy on the host: the batch is cut before it is copied
to the device, so no device-to-host copy is needed to find the width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Batch = Mapping[str, Any]


def used_span(mask: Any, multiple: int = 1) -> tuple[int, int]:
    """`(start, end)`: the columns of ``mask`` (batch, width) that some row uses, widened to a multiple of ``multiple``
    on the padded side (right when column 0 is used, else left) without leaving ``[0, width)``."""
    used = np.asarray(mask).astype(bool).any(axis=0)
    width = int(used.shape[0])
    cols = np.flatnonzero(used)
    if cols.size == 0:
        return 0, min(width, multiple)
    start, end = int(cols[0]), int(cols[-1]) + 1
    if start == 0:  # right-padded (or full)
        return 0, min(width, -(-end // multiple) * multiple)
    return max(0, width - (-(-(width - start) // multiple) * multiple)), end


def cut_columns(batch: Batch, mask_key: str, keys: Sequence[str], multiple: int = 1) -> dict[str, Any]:
    """``batch`` with ``mask_key`` and ``keys`` (those present, of the mask's width) cut to the mask's used span."""
    out = dict(batch)
    if mask_key not in batch:
        return out
    mask = batch[mask_key]
    width = int(mask.shape[1])
    start, end = used_span(mask, multiple)
    if (start, end) == (0, width):
        return out
    for key in (mask_key, *keys):
        value = batch.get(key)
        if value is not None and getattr(value, "ndim", 0) == 2 and value.shape[1] == width:
            cut = value[:, start:end]
            out[key] = cut.contiguous() if hasattr(cut, "contiguous") else np.ascontiguousarray(cut)
    return out


def token_counts(batch: Batch) -> tuple[int, int]:
    """(real, padded) text tokens of a batch: mask ones and mask cells, over every mask the model reads."""
    real = padded = 0
    for key in ("attention_mask", "decoder_attention_mask"):
        if key in batch:
            mask = batch[key]
            real += int(np.asarray(mask).sum())  # host arrays: numpy, not a torch scalar read
            padded += int(mask.shape[0]) * int(mask.shape[1])
    return real, padded
