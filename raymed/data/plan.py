"""What a run trains and evaluates on: the data directories of a config, the built-in synthetic Med-VQA (generated
once into the cache), and the optimizer steps per epoch that Ray Train's split of the training rows gives.

Eval sets: the training data's selection split (`data.select_split`, `val`: what sweeps choose on) and eval split
(`data.eval_split`, `test`: what runs report), each named after its split, then the synthetic `ood` set and
`data.eval_sets`, which are read on their `eval_split`.

Driver side, no Ray: `raymed.train` plans a run with it; `tools/pretrain.py`, the `questions` analysis and the
benchmarks use the same cached synthetic sets.
"""

from __future__ import annotations

import fcntl
import math
import os
from pathlib import Path

from raymed.config import Config, ConfigError

SELECT_HINT = (" (prepared before raymed carved validation splits? `raymed data prepare --overwrite` writes one; "
               "data.select_split=null selects on nothing)")
# Where generated data (and the benchmarks' models) are kept between runs.
CACHE = Path(os.environ.get("RAYMED_CACHE", Path.home() / ".cache" / "raymed"))


def synthetic_dataset(style: str, n: int, seed: int) -> Path:
    """Prepared shards of the built-in synthetic Med-VQA (generated once, cached by its parameters and by the val
    split `prepare` carves; trials of a sweep that start together wait for the first to write it)."""
    from raymed.data.prepare import MANIFEST, VAL_FRACTION, prepare
    from raymed.data.synth import generate

    root = CACHE / "synth" / f"{style}-n{n}-s{seed}"
    prepared = root / f"prepared-val{VAL_FRACTION:g}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (prepared / MANIFEST).is_file():
            if not (root / "raw" / "synth.json").is_file():  # written last: a complete folder
                generate(root / "raw", n=n, seed=seed, style=style)
            prepare("vqa-rad", root / "raw", prepared, overwrite=True, val_fraction=VAL_FRACTION)
    return prepared


def eval_set_names(cfg: Config) -> list[str]:
    """The names of a run's eval sets, in the order it evaluates them (`data_plan`'s keys, without any data)."""
    own = [s for s in dict.fromkeys((cfg.data.select_split, cfg.data.eval_split)) if s is not None]
    ood = ["ood"] if cfg.data.path is None and cfg.data.synth_ood_style and "ood" not in cfg.data.eval_sets else []
    return [*own, *ood, *cfg.data.eval_sets]


def eval_split_of(cfg: Config, name: str) -> str:
    """The split an eval set is read from: the selection set its split of the training data, the others their
    `data.eval_split`."""
    return name if name == cfg.data.select_split else cfg.data.eval_split


def data_plan(cfg: Config) -> tuple[str, dict[str, str]]:
    """(training data directory, eval set name -> directory), in `eval_set_names` order (a `data.eval_sets.ood`
    replaces the synthetic ood set)."""
    extra = dict(cfg.data.eval_sets)
    if cfg.data.path is None:
        train_dir = str(synthetic_dataset(cfg.data.synth_style, cfg.data.synth_n, cfg.train.seed))
        if cfg.data.synth_ood_style and "ood" not in extra:
            extra["ood"] = str(synthetic_dataset(cfg.data.synth_ood_style, max(cfg.data.synth_n // 4, 10),
                                                 cfg.train.seed + 1))
    else:
        train_dir = cfg.data.path
    return train_dir, {name: extra.get(name, train_dir) for name in eval_set_names(cfg)}


def micro_batches_per_epoch(train_dir: str, cfg: Config) -> dict[int, int]:
    """Micro-batches each worker trains on per epoch, at each world size the run may have (`scaling.num_workers`:
    one size, or min..max for an elastic run): Ray Train splits `train` equally across workers (remainder dropped),
    and the last micro-batch of an epoch may be short (optimizer steps: `optimizer_steps`). Checks on the way that
    the training data has the splits the run reads."""
    from raymed.data.prepare import read_manifest

    splits = read_manifest(train_dir)["splits"]
    missing = [f"data.{key}: no split {split!r} in {train_dir}; splits: {', '.join(splits)}"
               + (SELECT_HINT if key == "select_split" else "")
               for key in ("train_split", "select_split", "eval_split")
               if (split := getattr(cfg.data, key)) is not None and split not in splits]
    if missing:
        raise ConfigError(missing)
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
