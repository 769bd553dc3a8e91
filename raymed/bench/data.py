"""Suite `data`: the Ray Data pipeline vs a torch DataLoader, same shards, decoding and workers.

Both sides read the same Parquet shards (images compressed), decode each image with PIL and encode rows
with the model family's encoder through the same `DecodeAndEncode` class, in `workers` processes:
Ray Data as `raymed.data.stream.encoded_split` (an actor pool of `workers` actors, 1 CPU each) iterated
with `iter_torch_batches`; the DataLoader as an `IterableDataset` whose worker `i` takes every
`workers`-th shard. Reported: images/s over the whole pass, steady-state images/s (after the first
batch), and the time to the first batch, for the first and the last of `epochs` passes: a trainer
re-executes the dataset every epoch, and Ray Data starts its actor pool anew each time. A third
pipeline, `ray_tasks`, is the proposed change: the same read and transform as Ray tasks whose worker
processes keep the encoder. Rounds are interleaved.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import IterableDataset

from raymed.tables import table

from raymed.bench.common import (
    BENCH_MODEL, default_max_length, fit_model_name, header, median, model_ref, ratio, result, spread, synth_data,
    target, targets_table,
)


class ShardBatches(IterableDataset):
    """torch `IterableDataset` of encoded batches: DataLoader worker `i` of `n` reads shards i, i+n, ..."""

    def __init__(self, files: list[str], factory: Any, batch_size: int) -> None:
        super().__init__()
        self.files, self.factory, self.batch_size = files, factory, batch_size
        self.transform: Any = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq
        import torch
        from torch.utils.data import get_worker_info

        from raymed.data.transform import DecodeAndEncode

        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        if self.transform is None:  # once per worker process, like an actor's constructor
            self.transform = DecodeAndEncode(self.factory)
        for path in self.files[wid::n]:
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_size):
                out = self.transform(record_batch.to_pydict())
                yield {k: (torch.from_numpy(v) if v.dtype.kind in "biuf" else v.tolist()) for k, v in out.items()}


def _consume(batches: Any) -> dict[str, float]:
    """Iterate to the end; rows, total seconds and time to the first batch."""
    t0 = time.perf_counter()
    first, first_rows, rows = None, 0, 0
    for batch in batches:
        if first is None:
            first = time.perf_counter() - t0
            first_rows = len(batch["input_ids"])
        rows += len(batch["input_ids"])
    total = time.perf_counter() - t0
    steady = (rows - first_rows) / (total - first) if rows > first_rows and total > first else float("nan")
    return {"rows": rows, "total_s": total, "first_batch_s": first, "images_per_s": rows / total,
            "steady_images_per_s": steady}


_ENCODERS: dict[Any, Any] = {}


def encode_cached(batch: dict[str, Any], factory: Any) -> dict[str, Any]:
    """Task-based `map_batches` function: one `DecodeAndEncode` per worker process, kept across tasks.

    Ray reuses its worker processes for tasks, so from the second epoch on no process re-imports the
    processor's libraries or rebuilds the encoder — unlike an actor pool, which Ray Data starts anew
    with every execution of the dataset, i.e. every epoch (ray-project/ray#46479).
    """
    from raymed.data.transform import DecodeAndEncode

    transform = _ENCODERS.get(factory)
    if transform is None:
        transform = _ENCODERS[factory] = DecodeAndEncode(factory)
    return transform(batch)


def dataloader_epochs(data_dir: Path, factory: Any, batch_size: int, workers: int, epochs: int) -> list[dict]:
    from torch.utils.data import DataLoader

    from raymed.data.transform import shard_paths

    ds = ShardBatches(shard_paths(data_dir, "train"), factory, batch_size)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                        multiprocessing_context="fork" if workers else None)
    return [_consume(loader) for _ in range(epochs)]


def ray_data_epochs(data_dir: Path, factory: Any, batch_size: int, workers: int, epochs: int) -> list[dict]:
    """raymed's pipeline as the trainer gets it: `encoded_split` (actor pool), re-executed every epoch."""
    from raymed.data.stream import encoded_split, torch_batches

    ds = encoded_split(data_dir, "train", factory, batch_size=batch_size, actors=workers, num_cpus=1.0)
    return [_consume(torch_batches(ds, batch_size)) for _ in range(epochs)]


def ray_tasks_epochs(data_dir: Path, factory: Any, batch_size: int, workers: int, epochs: int) -> list[dict]:
    """The same read and transform as `encoded_split`, but as tasks with a per-process cached encoder."""
    from raymed.data.stream import read_split, torch_batches

    ds = read_split(data_dir, "train").map_batches(encode_cached, fn_kwargs={"factory": factory},
                                                    batch_size=batch_size, batch_format="numpy", num_cpus=1.0,
                                                    concurrency=workers)
    return [_consume(torch_batches(ds, batch_size)) for _ in range(epochs)]


def trainer_epochs(data_dir: Path, factory: Any, batch_size: int, workers: int, epochs: int) -> list[dict]:
    """What a raymed worker iterates: `encoded_split` (tasks) streamed on the first epoch, then the batches its
    `EpochBatches` kept in memory (`data.cache_mb`) replayed on the later ones."""
    from raymed.config import DataConfig
    from raymed.data.stream import encoded_split
    from raymed.data.epochs import EpochBatches

    ds = encoded_split(data_dir, "train", factory, batch_size=batch_size, actors=0, num_cpus=1.0)
    batches = EpochBatches(ds, batch_size, limit_mb=DataConfig().cache_mb, log=lambda msg: None)
    return [_consume(batches.epoch(e)) for e in range(epochs)]


PIPELINES = {
    "ray_data": ("Ray Data: encoded_split (actors)", ray_data_epochs),
    "ray_tasks": ("Ray Data: tasks + cached encoder", ray_tasks_epochs),
    "trainer": ("raymed worker: Ray Data (tasks) epoch 1, then data.cache_mb replay", trainer_epochs),
    "dataloader": ("torch DataLoader", dataloader_epochs),
}


def run(model: str = BENCH_MODEL, images: int = 400, image_size: int = 256, batch_size: int = 16, workers: int = 2,
        shards: int = 8, repeats: int = 2, epochs: int = 2, max_length: int | None = None,
        pipelines: tuple[str, ...] = tuple(PIPELINES)) -> dict[str, Any]:
    import ray

    from raymed.data.prepare import VAL_FRACTION, read_manifest, val_images
    from raymed.data.transform import FamilyEncoderFactory
    from raymed.models import load_processor
    from raymed.cluster import start_local_ray

    started = time.time()
    ref = model_ref(model)
    max_length = max_length or default_max_length(ref, load_processor(ref))
    train_images = images - round(images * 0.2)
    train_rows = 3 * (train_images - val_images(train_images, VAL_FRACTION))  # `prepare` carves val from train
    data_dir = synth_data(images, image_size=image_size, rows_per_shard=max(1, math.ceil(train_rows / shards)))
    manifest = read_manifest(data_dir)["splits"]["train"]
    # The factory pickles only plain fields; a directory (or preset) name is what workers can resolve.
    factory = FamilyEncoderFactory(ref.family.name, fit_model_name(model), max_length, train=True)
    config = {"model": model, "images": images, "image_size": image_size, "train_rows": manifest["rows"],
              "shards": len(manifest["shards"]), "batch_size": batch_size, "workers": workers, "repeats": repeats,
              "epochs": epochs, "max_length": max_length, "pipelines": list(pipelines)}
    started_ray = not ray.is_initialized()
    if started_ray:  # the actors' CPUs + read tasks + this driver: logical CPUs, oversubscribed on small machines
        start_local_ray(num_cpus=max(os.cpu_count() or 1, workers + 1), log_to_driver=False,
                        runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
    runs: dict[str, list[list[dict[str, float]]]] = {p: [] for p in pipelines}
    loads = []
    try:
        for r in range(repeats):
            order = list(pipelines[r % len(pipelines):]) + list(pipelines[: r % len(pipelines)])
            for name in order:
                passes = PIPELINES[name][1](data_dir, factory, batch_size, workers, epochs)
                runs[name].append(passes)
                loads.append(os.getloadavg()[0])
                print(f"[bench data] round {r + 1}/{repeats} {name}: " + ", ".join(
                    f"epoch {e + 1} {p['images_per_s']:.1f} images/s (first batch {p['first_batch_s']:.1f} s)"
                    for e, p in enumerate(passes)), flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    rows = summarize(runs)
    by = {row["key"]: row for row in rows}
    targets = []
    if "ray_data" in by and "dataloader" in by:
        targets += [
            target("Ray Data / DataLoader images/s, last epoch", by["ray_data"]["ratio"], 1.0, ">=",
                   "whole pass, incl. the epoch's start-up"),
            target("  ... steady state (after the first batch)", by["ray_data"]["steady_ratio"], 1.0, ">=", ""),
        ]
    if "ray_tasks" in by and "dataloader" in by:
        targets.append(target("Ray Data (tasks + cached encoder) / DataLoader, last epoch", by["ray_tasks"]["ratio"],
                              1.0, ">=", "preprocess_actors: 0, streamed every epoch"))
    if "trainer" in by and "dataloader" in by:
        targets += [
            target("raymed worker / DataLoader, last epoch", by["trainer"]["ratio"], 1.0, ">=",
                   "replayed from memory: no decode"),
            target("raymed worker / DataLoader, all epochs", by["trainer"]["run_ratio"], 1.0, ">=",
                   f"images/s over the {len(runs['trainer'][0])} epochs together"),
        ]
    config["load_1min_during"] = spread(loads)
    return result("data", config, rows, targets, started, runs=runs)


def summarize(runs: dict[str, list[list[dict[str, float]]]]) -> list[dict[str, Any]]:
    """Per pipeline: first- and last-epoch figures (medians over rounds), ratios to the DataLoader by round."""
    ref = runs.get("dataloader", [])
    rows = []
    for name, rounds in runs.items():
        first, last = [r[0] for r in rounds], [r[-1] for r in rounds]
        paired = list(zip(rounds, ref))
        rows.append({
            "key": name, "pipeline": PIPELINES[name][0], "rows": last[0]["rows"],
            "first_epoch_images_per_s": median([p["images_per_s"] for p in first]),
            "images_per_s": median([p["images_per_s"] for p in last]),
            "steady_images_per_s": median([p["steady_images_per_s"] for p in last]),
            "first_batch_s": median([p["first_batch_s"] for p in last]),
            "first_epoch_first_batch_s": median([p["first_batch_s"] for p in first]),
            "ratio": median([ratio(a[-1]["images_per_s"], b[-1]["images_per_s"]) for a, b in paired]),
            "steady_ratio": median([ratio(a[-1]["steady_images_per_s"], b[-1]["steady_images_per_s"])
                                    for a, b in paired]),
            "first_epoch_ratio": median([ratio(a[0]["images_per_s"], b[0]["images_per_s"]) for a, b in paired]),
            "run_ratio": median([ratio(sum(p["total_s"] for p in b), sum(p["total_s"] for p in a)) for a, b in paired]),
        })
    return rows


COLUMNS = [("pipeline", "pipeline"), ("first_epoch_images_per_s", "epoch 1 img/s"), ("first_epoch_ratio", "x DL"),
           ("first_epoch_first_batch_s", "1st batch s"), ("images_per_s", "last epoch img/s"), ("ratio", "x DL"),
           ("first_batch_s", "1st batch s"), ("steady_images_per_s", "steady img/s"), ("steady_ratio", "x DL"),
           ("run_ratio", "all epochs x DL")]


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return "\n".join([
        header(doc),
        f"model {c['model']} encoder ({c['max_length']} tokens), {c['train_rows']} rows in {c['shards']} shards, "
        f"{c['image_size']} px PNG, batch {c['batch_size']}, {c['workers']} workers each, {c['epochs']} epochs per "
        f"pipeline, {c['repeats']} interleaved rounds (DL = DataLoader); "
        f"1-min load during the run {c['load_1min_during']}",
        table(doc["rows"], COLUMNS), targets_table(doc["targets"]),
    ])


def add_arguments(ap: Any) -> None:
    ap.add_argument("--model", default=BENCH_MODEL, help="whose encoder (processor) the rows go through")
    ap.add_argument("--images", type=int, default=400, help="synthetic images (3 rows each, 80%% train)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="Ray Data actors = DataLoader workers")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="passes over the data per pipeline (as a trainer makes)")
    ap.add_argument("--pipelines", default=" ".join(PIPELINES), help="space-separated (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=None)


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, images=args.images, image_size=args.image_size, batch_size=args.batch_size,
               workers=args.workers, shards=args.shards, repeats=args.repeats, epochs=args.epochs,
               max_length=args.max_length, pipelines=tuple(args.pipelines.split()))
