"""Suite `padding`: training throughput at a long `data.max_length` vs a short one, on the same rows.

Batches are cut to their longest sample (`data.pad_to_multiple_of`), so the limit should cost nothing once it is
above the data's lengths: the target is samples/s at the long limit >= 0.85x that at the short one. Each setting is
one `raymed.train.launch.fit` (1 Ray Train worker, ZeRO as raymed runs it), measured on its last epoch (start-up and the
first epoch's warm-up excluded, as in the `overhead` suite); the epoch's padding fraction is printed beside it.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from raymed.tables import table

from raymed.bench.common import header, median, ratio, result, target, targets_table
from raymed.bench.overhead import raymed_run

MODEL = "tiny-llava-med"


def run(model: str = MODEL, method: str = "ln", images: int = 20, batch_size: int = 4, epochs: int = 2,
        lengths: tuple[int, ...] = (160, 640), cpus_per_worker: float = 2.0, repeats: int = 1) -> dict[str, Any]:
    import ray

    from raymed.cluster import init_ray, required_cpus
    from raymed.config import load_config

    started = time.time()
    if epochs < 2:
        raise ValueError("padding: epochs must be >= 2 (the first epoch is warm-up)")
    config = {"model": model, "method": method, "images": images, "batch_size": batch_size, "epochs": epochs,
              "lengths": list(lengths), "cpus_per_worker": cpus_per_worker, "repeats": repeats}
    started_ray = not ray.is_initialized()
    init_ray(required_cpus(load_config(None, {"model.name": model, "scaling.num_workers": 1,
                                              "scaling.cpus_per_worker": cpus_per_worker})) + 1)
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in lengths}
    try:
        with tempfile.TemporaryDirectory(prefix="raymed-bench-padding-") as storage:
            for r in range(repeats):
                for n in lengths:
                    out = raymed_run(model, method, images, n, batch_size, epochs, 1e-4, "0", cpus_per_worker,
                                     storage, f"padding-{n}-r{r}")
                    runs[n].append(out)
                    print(f"[bench padding] round {r + 1}: max_length {n}: {out['samples_per_s']:.2f} samples/s, "
                          f"padding {out['padding_fraction']:.1%}", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    base = median([o["samples_per_s"] for o in runs[lengths[0]]])
    rows = [{"max_length": n, "samples_per_s": median([o["samples_per_s"] for o in outs]),
             "ratio": ratio(median([o["samples_per_s"] for o in outs]), base),
             "padding_fraction": median([o["padding_fraction"] for o in outs]),
             "losses": outs[0]["losses"]} for n, outs in runs.items()]
    targets = [target(f"samples/s at max_length {rows[-1]['max_length']} / at {lengths[0]}", rows[-1]["ratio"], 0.85,
                      ">=", "last epoch; same rows, same run otherwise")]
    return result("padding", config, rows, targets, started, raymed={str(k): v for k, v in runs.items()})


COLUMNS = [("max_length", "data.max_length"), ("samples_per_s", "samples/s"), ("ratio", "x shortest"),
           ("padding_fraction", "padding fraction")]


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return "\n".join([
        header(doc),
        f"model {c['model']}, method {c['method']}, {c['images']} synthetic images (3 questions each), batch "
        f"{c['batch_size']}, {c['epochs']} epochs (last measured), 1 worker x {c['cpus_per_worker']} CPUs",
        table(doc["rows"], COLUMNS), targets_table(doc["targets"]),
    ])


def add_arguments(ap: Any) -> None:
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--method", default="ln")
    ap.add_argument("--images", type=int, default=20, help="synthetic images (3 questions each; 80%% train)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2, help=">= 2; the last epoch is measured")
    ap.add_argument("--lengths", default="160,640", help="comma-separated data.max_length values; the first is 1.0x")
    ap.add_argument("--cpus-per-worker", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=1)


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, method=args.method, images=args.images, batch_size=args.batch_size,
               epochs=args.epochs, lengths=tuple(int(x) for x in args.lengths.split(",")),
               cpus_per_worker=args.cpus_per_worker, repeats=args.repeats)
