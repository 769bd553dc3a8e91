"""What a run trains and evaluates on: the data directories of a config, the built-in synthetic Med-VQA (generated
once into the cache), and the optimizer steps per epoch that Ray Train's split of the training rows gives.

Driver side, no Ray: `raymed.train` plans a run with it; `raymed.pretrain`, the `questions` analysis and the
benchmarks use the same cached synthetic sets.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..config import Config, ConfigError

# Where generated data (and the benchmarks' models) are kept between runs.
CACHE = Path(os.environ.get("RAYMED_CACHE", Path.home() / ".cache" / "raymed"))


def synthetic_dataset(style: str, n: int, seed: int) -> Path:
    """Prepared shards of the built-in synthetic Med-VQA (generated once, cached by its parameters)."""
    from .prepare import MANIFEST, prepare
    from .synth import generate

    root = CACHE / "synth" / f"{style}-n{n}-s{seed}"
    prepared = root / "prepared"
    if not (prepared / MANIFEST).is_file():
        generate(root / "raw", n=n, seed=seed, style=style)
        prepare("vqa-rad", root / "raw", prepared, overwrite=True)
    return prepared


def data_plan(cfg: Config) -> tuple[str, dict[str, str]]:
    """(training data directory, eval sets name -> directory); the main eval set is named after its split."""
    if cfg.data.path is None:
        train_dir = str(synthetic_dataset(cfg.data.synth_style, cfg.data.synth_n, cfg.train.seed))
        extra = {}
        if cfg.data.synth_ood_style:
            extra["ood"] = str(synthetic_dataset(cfg.data.synth_ood_style, max(cfg.data.synth_n // 4, 10),
                                                 cfg.train.seed + 1))
    else:
        train_dir, extra = cfg.data.path, {}
    return train_dir, {cfg.data.eval_split: train_dir, **extra, **cfg.data.eval_sets}


def micro_batches_per_epoch(train_dir: str, cfg: Config) -> dict[int, int]:
    """Micro-batches each worker trains on per epoch, at each world size the run may have (`scaling.num_workers`:
    one size, or min..max for an elastic run): Ray Train splits `train` equally across workers (remainder dropped),
    and the last micro-batch of an epoch may be short. Optimizer steps: `optimizer_steps`."""
    from .prepare import read_manifest

    splits = read_manifest(train_dir)["splits"]
    if cfg.data.train_split not in splits:
        raise ConfigError([f"data.train_split: no split {cfg.data.train_split!r} in {train_dir}; "
                           f"splits: {', '.join(splits)}"])
    rows = splits[cfg.data.train_split]["rows"]
    if rows // cfg.scaling.max_workers == 0:
        raise ConfigError([f"scaling.num_workers: {cfg.scaling.max_workers} workers but only {rows} training rows"])
    return {n: math.ceil((rows // n) / cfg.train.batch_size)
            for n in range(cfg.scaling.min_workers, cfg.scaling.max_workers + 1)}


def optimizer_steps(micro_batches: int, grad_accum: int) -> int:
    """Optimizer steps of an epoch of `micro_batches`: one per `grad_accum` micro-batches, and one for a shorter
    last group (every epoch ends on an accumulation boundary, so no gradient carries over into the next epoch or
    into a checkpoint)."""
    return math.ceil(micro_batches / grad_accum)
