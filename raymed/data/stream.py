"""Streaming prepared shards through Ray Data to Ray Train workers.

Training path (the driver builds the dataset, the workers consume their shards)::

    ds = encoded_split(data_dir, "train", FamilyEncoderFactory("miss", model_ref, max_length=32))
    trainer = TorchTrainer(loop, datasets={"train": ds}, ...)
    # in the worker loop (a seeded order per epoch, see raymed.data.epochs):
    for batch in EpochBatches(ray.train.get_dataset_shard("train"), 8, limit_mb=2048, seed=0).epoch(e): ...

Images stay compressed in the object store until :class:`DecodeAndEncode` (an actor pool in the
stream) decodes them with PIL and calls the model family's encoder, so memory is bounded by Ray
Data's streaming backpressure, not by the dataset size. Ray Train's default ``DataConfig`` splits
``train`` with ``equal=True``: every worker gets the same number of rows (so DDP steps stay in
lock-step), dropping at most ``world_size - 1`` rows per epoch.

Evaluation rows are read without Ray: see :mod:`raymed.data.rows`.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from raymed.data.transform import DecodeAndEncode, EncoderFactory, shard_paths

if TYPE_CHECKING:
    import ray.data
    import torch


def quiet_data_context() -> None:
    """Turn Ray Data's progress bars off in this process (call it in drivers, trials and workers)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


def ingest_config(preserve_order: bool = True) -> "ray.train.DataConfig":
    """Ray Train's data config for the training stream: Ray Train's default ingest options, with
    ``preserve_order`` set as asked.

    Ray Data's default hands blocks to the workers as they finish, so with more than one block in flight the
    batch order (and the trained weights) depend on timing: a re-run on a busier machine trains on another
    order. With ``preserve_order`` the blocks arrive in file order (prepared shards keep the source order), and
    the worker's :class:`raymed.data.epochs.EpochBatches` shuffles them per (seed, epoch): a run is reproducible
    for its seed.
    """
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = preserve_order
    return ray.train.DataConfig(execution_options=options)


def block_bytes_for_cluster() -> int | None:
    """A Ray Data block size that keeps streaming inside the object store of the running cluster.

    Ray Data holds about ``2 x concurrency x block size`` in the object store, and by default it
    bundles Parquet files into 128 MiB read blocks: too big for image rows on a small store (it
    spills to disk). ``object store / (4 x CPUs)``, clamped to [1, 128] MiB, stays well inside it.
    None when Ray is not initialised yet (Ray's default then applies).
    """
    import ray

    if not ray.is_initialized():
        return None
    resources = ray.cluster_resources()
    store, cpus = resources.get("object_store_memory"), resources.get("CPU", 1.0)
    if not store:
        return None
    return int(min(128 << 20, max(1 << 20, store / (4 * max(cpus, 1.0)))))


# Ray Data's Parquet reader (datasource V2) reads file footers on a pool of `FooterReader` actors, 10 files a
# batch, and starts 32 of them for every read whatever the file count (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, read when
# `read_parquet` builds the reader). A split is a few shards: 31 idle actor processes per read, ~8 CPU-seconds of
# process start-up per training run on a 2-core machine (measured: 40 s -> 32 s for a tiny run).
FOOTER_ENV, FOOTER_BATCH_FILES, FOOTER_MAX_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", 10, 32


@contextlib.contextmanager
def footer_readers(files: int) -> Iterator[int]:
    """While Ray Data builds a Parquet read of `files` files: one footer-reading actor per batch of footers
    (Ray's own cap of 32 kept), unless the user set `RAY_DATA_PARQUET_FOOTER_NUM_ACTORS` themselves."""
    if FOOTER_ENV in os.environ:
        yield int(os.environ[FOOTER_ENV])
        return
    actors = max(1, min(FOOTER_MAX_ACTORS, math.ceil(files / FOOTER_BATCH_FILES)))
    os.environ[FOOTER_ENV] = str(actors)
    try:
        yield actors
    finally:
        os.environ.pop(FOOTER_ENV, None)


def read_split(data_dir: Path | str, split: str, *, columns: Sequence[str] | None = None,
               block_bytes: int | None = None, read_cpus: float = 0.25) -> "ray.data.Dataset":
    """A lazy Ray Dataset over one split's shards; images stay compressed bytes.

    ``block_bytes`` bounds the size of each block read (default: :func:`block_bytes_for_cluster`).
    ``read_cpus``: logical CPUs per read task; fractional, so reads still schedule when training
    workers hold most CPUs of a small cluster (a 1-CPU read task can wait forever there).
    """
    import ray.data

    from raymed import storage

    quiet_data_context()
    paths = shard_paths(data_dir, split)
    fs = storage.filesystem(paths[0])[0] if paths and storage.is_uri(paths[0]) else None
    with footer_readers(len(paths)):
        ds = ray.data.read_parquet([storage.filesystem(p)[1] for p in paths] if fs else paths,
                                   filesystem=fs, columns=list(columns) if columns else None, num_cpus=read_cpus)
    block_bytes = block_bytes or block_bytes_for_cluster()
    if block_bytes:
        ds.context.target_max_block_size = block_bytes
    return ds


def encoded_split(
    data_dir: Path | str,
    split: str,
    encoder_factory: EncoderFactory,
    *,
    batch_size: int = 32,
    actors: int = 1,
    num_cpus: float = 0.5,
    keep: Sequence[str] = ("id",),
    max_image_side: int | None = None,
    block_bytes: int | None = None,
) -> "ray.data.Dataset":
    """``read_split`` + :class:`DecodeAndEncode` in an actor pool of ``actors`` (``num_cpus`` each).

    ``actors=0`` runs the transform as Ray tasks instead, each process building the encoder once
    (:func:`decode_and_encode`): no actor start-up per run, so short runs and sweeps of many trials
    start faster on warm clusters. A fractional ``num_cpus`` leaves room for Ray Train workers on small
    machines (docs/DESIGN.md §6.4).
    """
    import ray.data

    ds = read_split(data_dir, split, block_bytes=block_bytes)
    common = {"batch_size": batch_size, "batch_format": "numpy", "num_cpus": num_cpus}
    if actors == 0:
        return ds.map_batches(decode_and_encode, fn_kwargs={"encoder_factory": encoder_factory, "keep": tuple(keep),
                                                            "max_image_side": max_image_side}, **common)
    return ds.map_batches(
        DecodeAndEncode,
        fn_constructor_args=(encoder_factory,),
        fn_constructor_kwargs={"keep": tuple(keep), "max_image_side": max_image_side},
        compute=ray.data.ActorPoolStrategy(size=actors),
        **common,
    )


_TRANSFORMS: dict[Any, DecodeAndEncode] = {}


def decode_and_encode(batch: dict[str, np.ndarray], *, encoder_factory: EncoderFactory, keep: tuple[str, ...],
                      max_image_side: int | None) -> dict[str, np.ndarray]:
    """Task form of :class:`DecodeAndEncode`: the transform is built once per process and reused."""
    key = (encoder_factory, keep, max_image_side)
    if key not in _TRANSFORMS:
        _TRANSFORMS[key] = DecodeAndEncode(encoder_factory, keep=keep, max_image_side=max_image_side)
    return _TRANSFORMS[key](batch)


class TorchCollate(NumpyBatchCollateFn):
    """Numeric columns -> tensors; string columns (``id``) stay Python lists (Ray's default collate
    cannot convert them)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, "torch.Tensor | list[Any]"]:
        import torch

        return {k: (torch.as_tensor(v) if v.dtype.kind in "biuf" else v.tolist()) for k, v in batch.items()}


def torch_batches(iterator: Any, batch_size: int, **kwargs: Any) -> Iterator[dict[str, "torch.Tensor | list[Any]"]]:
    """``iter_torch_batches`` of a dataset or ``get_dataset_shard`` iterator, with :class:`TorchCollate`.

    ``kwargs`` go to ``iter_torch_batches`` (``drop_last``, ``local_shuffle_buffer_size``, ``device``...).
    """
    return iterator.iter_torch_batches(batch_size=batch_size, collate_fn=TorchCollate(), **kwargs)
