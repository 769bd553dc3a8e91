"""Suite `data`: the Ray Data pipeline vs a torch DataLoader, same shards, decoding and workers.

Both sides read the same Parquet shards (images compressed), decode each image with PIL and encode rows
with the model family's encoder through the same `DecodeAndEncode` class, in `workers` processes:
Ray Data as `raymed.data.stream.encoded_split` (an actor pool of `workers` actors, 1 CPU each) iterated
with `iter_torch_batches`; the DataLoader as an `IterableDataset` whose worker `i` takes every
`workers`-th shard. Reported: images/s over the whole pass, steady-state images/s (after the first
batch, so process start-up is excluded), and the time to the first batch. Rounds are interleaved.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import IterableDataset

from .common import (
    BENCH_MODEL, default_max_length, fit_model_name, header, median, model_ref, ratio, result, spread, synth_data,
    table, target, targets_table,
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
    first, rows = None, 0
    for batch in batches:
        if first is None:
            first = time.perf_counter() - t0
            first_rows = len(batch["input_ids"])
        rows += len(batch["input_ids"])
    total = time.perf_counter() - t0
    steady = (rows - first_rows) / (total - first) if rows > first_rows and total > first else float("nan")
    return {"rows": rows, "total_s": total, "first_batch_s": first, "images_per_s": rows / total,
            "steady_images_per_s": steady}


def dataloader_pass(data_dir: Path, factory: Any, batch_size: int, workers: int) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from raymed.data.transform import shard_paths

    ds = ShardBatches(shard_paths(data_dir, "train"), factory, batch_size)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                        multiprocessing_context="fork" if workers else None)
    return _consume(loader)


def ray_data_pass(data_dir: Path, factory: Any, batch_size: int, workers: int) -> dict[str, float]:
    from raymed.data.stream import encoded_split, torch_batches

    ds = encoded_split(data_dir, "train", factory, batch_size=batch_size, actors=workers, num_cpus=1.0)
    return _consume(torch_batches(ds, batch_size))


def run(model: str = BENCH_MODEL, images: int = 400, image_size: int = 256, batch_size: int = 16, workers: int = 2,
        shards: int = 8, repeats: int = 3, max_length: int | None = None) -> dict[str, Any]:
    import ray

    from raymed.data.prepare import read_manifest
    from raymed.data.transform import FamilyEncoderFactory
    from raymed.models import load_processor

    started = time.time()
    ref = model_ref(model)
    max_length = max_length or default_max_length(ref, load_processor(ref))
    train_rows = 3 * (images - round(images * 0.2))
    data_dir = synth_data(images, image_size=image_size, rows_per_shard=max(1, math.ceil(train_rows / shards)))
    manifest = read_manifest(data_dir)["splits"]["train"]
    # The factory pickles only plain fields; a directory (or preset) name is what workers can resolve.
    factory = FamilyEncoderFactory(ref.family.name, fit_model_name(model), max_length, train=True)
    config = {"model": model, "images": images, "image_size": image_size, "train_rows": manifest["rows"],
              "shards": len(manifest["shards"]), "batch_size": batch_size, "workers": workers, "repeats": repeats,
              "max_length": max_length}
    started_ray = not ray.is_initialized()
    if started_ray:  # the actors' CPUs + read tasks + this driver: logical CPUs, oversubscribed on small machines
        ray.init(num_cpus=max(os.cpu_count() or 1, workers + 1), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
    runs: dict[str, list[dict[str, float]]] = {"ray_data": [], "dataloader": []}
    loads = []
    try:
        for r in range(repeats):
            order = ("ray_data", "dataloader") if r % 2 == 0 else ("dataloader", "ray_data")
            for side in order:
                fn = ray_data_pass if side == "ray_data" else dataloader_pass
                out = fn(data_dir, factory, batch_size, workers)
                out["round"] = r
                runs[side].append(out)
                loads.append(os.getloadavg()[0])
                print(f"[bench data] round {r + 1}/{repeats} {side}: {out['images_per_s']:.1f} images/s "
                      f"(steady {out['steady_images_per_s']:.1f}, first batch {out['first_batch_s']:.1f} s)", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    rows = []
    for side, outs in runs.items():
        other = {o["round"]: o for o in runs["dataloader"]}
        rows.append({
            "pipeline": "Ray Data (encoded_split)" if side == "ray_data" else "torch DataLoader",
            "images_per_s": median([o["images_per_s"] for o in outs]),
            "steady_images_per_s": median([o["steady_images_per_s"] for o in outs]),
            "first_batch_s": median([o["first_batch_s"] for o in outs]),
            "ratio": median([ratio(o["images_per_s"], other[o["round"]]["images_per_s"]) for o in outs]),
            "steady_ratio": median([ratio(o["steady_images_per_s"], other[o["round"]]["steady_images_per_s"])
                                    for o in outs]),
            "rows": outs[0]["rows"],
        })
    targets = [
        target("Ray Data / DataLoader images/s (steady)", rows[0]["steady_ratio"], 1.0, ">=", "after the first batch"),
        target("Ray Data / DataLoader images/s (whole pass)", rows[0]["ratio"], 1.0, ">=", "incl. start-up"),
    ]
    config["load_1min_during"] = spread(loads)
    return result("data", config, rows, targets, started, runs=runs)


COLUMNS = [("pipeline", "pipeline"), ("images_per_s", "images/s"), ("ratio", "x DataLoader"),
           ("steady_images_per_s", "steady images/s"), ("steady_ratio", "x DataLoader"),
           ("first_batch_s", "first batch s"), ("rows", "rows")]


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return "\n".join([
        header(doc),
        f"model {c['model']} encoder ({c['max_length']} tokens), {c['train_rows']} rows in {c['shards']} shards, "
        f"{c['image_size']} px PNG, batch {c['batch_size']}, {c['workers']} workers each, {c['repeats']} rounds; "
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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=None)


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, images=args.images, image_size=args.image_size, batch_size=args.batch_size,
               workers=args.workers, shards=args.shards, repeats=args.repeats, max_length=args.max_length)
