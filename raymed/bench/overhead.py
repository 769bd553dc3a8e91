"""Suite `overhead`: raymed's recipe (Ray Train, 1 worker, DeepSpeed) vs a plain PyTorch loop.

Same model, method, data (the synthetic Med-VQA shards `fit` trains on), batch size and CPU threads.
The plain loop is the limit: batches pre-encoded in memory, then forward, backward, gradient clipping,
AdamW over the trainable parameters, cosine schedule. The recipe runs through `raymed.train.fit` with
ZeRO stage 0 (DeepSpeed engine, no partitioning) and 2. Throughput is taken from the *last* epoch of
each run, so start-up (Ray, actors, imports, model build) and the first epoch's warm-up are excluded:
the worker reports cumulative samples/s per epoch, from which each epoch's own rate follows.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

from raymed.tables import table

from .common import (
    BENCH_MODEL, default_max_length, encoded_batches, fit_model_name, header, median, model_ref, ratio, result, spread,
    synth_data, target, targets_table,
)


def plain_loop(model_name: str, method: str, batches: list[dict[str, Any]], epochs: int, lr: float,
               threads: int, seed: int = 0) -> dict[str, Any]:
    """Train in-process on pre-encoded batches; seconds and samples per epoch."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from raymed.methods import apply_method
    from raymed.models import load_model

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = model_ref(model_name)
        model, acc = apply_method(load_model(ref, seed=seed), ref, method)
        model.train()
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0})
                  if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        total = epochs * len(batches)
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.1 * total), total)
        trainable = [p for g in groups for p in g["params"]]
        epoch_s, losses = [], []
        for _ in range(epochs):
            t0 = time.perf_counter()
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            epoch_s.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    return {"epoch_s": epoch_s, "samples_per_epoch": samples, "samples_per_s": samples / epoch_s[-1],
            "trainable": acc.trainable, "loss_first_last": [losses[0], losses[-1]]}


def epoch_rates(history: list[dict[str, Any]], samples_per_epoch: int) -> list[float]:
    """Each epoch's own samples/s from the worker's cumulative `samples_per_s` reports."""
    rates, prev_n, prev_t = [], 0, 0.0
    for k, h in enumerate(history, start=1):
        n = k * samples_per_epoch
        t = n / h["samples_per_s"]
        rates.append((n - prev_n) / (t - prev_t))
        prev_n, prev_t = n, t
    return rates


def parse_setup(setup: str) -> tuple[int, bool]:
    """`"2"` -> ZeRO-2 as raymed runs it (stage 0 for one fp32 worker); `"2!"` -> ZeRO-2 forced."""
    return int(setup.rstrip("!")), setup.endswith("!")


def setup_label(setup: str) -> str:
    stage, forced = parse_setup(setup)
    if forced:
        return f"raymed 1 worker, ZeRO-{stage} forced (shard_single_worker)"
    return f"raymed 1 worker, ZeRO-{stage}" + (" (runs stage 0: 1 worker)" if stage else "")


def raymed_run(model_dir: str, method: str, images: int, max_length: int, batch_size: int, epochs: int, lr: float,
               setup: str, cpus_per_worker: float, storage: str, name: str) -> dict[str, Any]:
    """One `fit` with 1 Ray Train worker; per-epoch rates and start-up from its summary."""
    from raymed.config import load_config
    from raymed.train import fit

    zero_stage, forced = parse_setup(setup)
    cfg = load_config(None, {
        "model.name": model_dir, "method.name": method, "data.synth_n": images, "data.max_length": max_length,
        "data.synth_ood_style": None, "data.max_eval_rows": 1, "train.epochs": epochs, "train.batch_size": batch_size,
        "train.lr": lr, "train.zero_shot": False, "train.eval_every": epochs, "train.eval_batch_size": 1,
        "train.max_new_tokens": 1, "scaling.num_workers": 1, "scaling.cpus_per_worker": cpus_per_worker,
        "deepspeed.zero_stage": zero_stage, "deepspeed.shard_single_worker": forced, "run.storage": storage,
        "run.name": name, "run.metrics_export": False, "run.keep_checkpoints": 1,
    })
    t0 = time.time()
    summary = fit(cfg)
    wall = time.time() - t0
    from raymed.data.prepare import read_manifest
    from raymed.data.plan import data_plan

    rows = read_manifest(data_plan(cfg)[0])["splits"]["train"]["rows"]
    rates = epoch_rates(summary["history"], rows)
    train_s = sum(rows / r for r in rates)
    return {"setup": setup, "zero_stage": zero_stage, "ran_stage": summary["history"][-1].get("zero_stage"),
            "cpus_per_worker": cpus_per_worker, "epoch_rates": rates,
            "samples_per_s": rates[-1], "samples_per_epoch": rows, "wall_s": wall, "train_s": train_s,
            "outside_training_s": wall - train_s, "trainable": summary["params"]["trainable"],
            "losses": [h["loss"] for h in summary["history"]],
            "padding_fraction": summary["history"][-1].get("padding_fraction")}


def run(model: str = BENCH_MODEL, method: str = "full", images: int = 14, batch_size: int = 4, epochs: int = 2,
        lr: float = 1e-4, zero_stages: tuple[str, ...] = ("0", "2", "2!"), cpus_per_worker: float = 2.0,
        threads: int = 2, repeats: int = 1, max_length: int | None = None) -> dict[str, Any]:
    import ray

    from raymed.models import load_processor
    from raymed.cluster import init_ray, required_cpus

    started = time.time()
    if epochs < 2:
        raise ValueError("overhead: epochs must be >= 2 (the first epoch is warm-up)")
    ref = model_ref(model)
    max_length = max_length or default_max_length(ref, load_processor(ref))
    data_dir = synth_data(images)  # the directory `fit` generates for data.synth_n=images
    t0 = time.perf_counter()
    batches = encoded_batches(model, data_dir, "train", batch_size, max_length)
    encode_s = time.perf_counter() - t0
    model_dir = fit_model_name(model)
    config = {"model": model, "model_dir": model_dir, "method": method, "images": images,
              "train_rows": sum(int(b["input_ids"].shape[0]) for b in batches), "batch_size": batch_size,
              "max_length": max_length, "epochs": epochs, "zero_stages": list(zero_stages),
              "cpus_per_worker": cpus_per_worker, "threads": threads, "repeats": repeats,
              "plain_encode_s": encode_s}
    from raymed.config import load_config

    started_ray = not ray.is_initialized()
    init_ray(required_cpus(load_config(None, {"model.name": model_dir, "scaling.num_workers": 1,
                                              "scaling.cpus_per_worker": cpus_per_worker})) + 1)
    plains, runs, loads = [], {s: [] for s in zero_stages}, []
    try:
        with tempfile.TemporaryDirectory(prefix="raymed-bench-overhead-") as storage:
            for r in range(repeats):
                plains.append(plain_loop(model, method, batches, epochs, lr, threads))
                loads.append(os.getloadavg()[0])
                print(f"[bench overhead] round {r + 1}: plain {plains[-1]['samples_per_s']:.2f} samples/s", flush=True)
                for s in zero_stages:
                    out = raymed_run(model_dir, method, images, max_length, batch_size, epochs, lr, s,
                                     cpus_per_worker, storage, f"overhead-z{s}-r{r}")
                    out["round"] = r
                    runs[s].append(out)
                    loads.append(os.getloadavg()[0])
                    print(f"[bench overhead] round {r + 1}: {setup_label(s)} {out['samples_per_s']:.2f} samples/s "
                          f"(wall {out['wall_s']:.0f} s)", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    plain_rate = median([p["samples_per_s"] for p in plains])
    rows = [{"setup": "plain PyTorch loop", "samples_per_s": plain_rate, "ratio": 1.0,
             "step_s": batch_size / plain_rate, "wall_s": None, "outside_training_s": None}]
    targets = []
    for s, outs in runs.items():
        ratios = [ratio(o["samples_per_s"], plains[o["round"]]["samples_per_s"]) for o in outs]
        rate = median([o["samples_per_s"] for o in outs])
        stage, forced = parse_setup(s)
        rows.append({"setup": setup_label(s), "zero_stage": stage, "ran_stage": outs[0]["ran_stage"],
                     "samples_per_s": rate,
                     "ratio": median(ratios), "ratio_rounds": ratios, "step_s": batch_size / rate,
                     "wall_s": median([o["wall_s"] for o in outs]),
                     "outside_training_s": median([o["outside_training_s"] for o in outs])})
        if not forced:  # the targets are about what raymed runs; forced stages are for reference
            targets.append(target(f"raymed ZeRO-{s} / plain loop", median(ratios), 0.90, ">=",
                                  f"samples/s of the last epoch; ran stage {outs[0]['ran_stage']}"))
    config["load_1min_during"] = spread(loads)
    return result("overhead", config, rows, targets, started, plain=plains, raymed={str(k): v for k, v in runs.items()})


COLUMNS = [("setup", "setup"), ("ran_stage", "ran stage"), ("samples_per_s", "samples/s"), ("ratio", "x plain"),
           ("step_s", "s/step"), ("wall_s", "wall s"), ("outside_training_s", "start-up+eval+ckpt s")]


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return "\n".join([
        header(doc),
        f"model {c['model']}, method {c['method']}, {c['train_rows']} rows x {c['epochs']} epochs, batch "
        f"{c['batch_size']}, {c['threads']} threads (plain) / {c['cpus_per_worker']} CPUs per worker; "
        f"1-min load during the run {c['load_1min_during']}",
        table(doc["rows"], COLUMNS), targets_table(doc["targets"]),
    ])


def add_arguments(ap: Any) -> None:
    ap.add_argument("--model", default=BENCH_MODEL)
    ap.add_argument("--method", default="full")
    ap.add_argument("--images", type=int, default=14, help="synthetic images (3 questions each; 80%% train)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2, help=">= 2; the last epoch is measured")
    ap.add_argument("--zero-stages", default="0,2,2!",
                    help="comma-separated; N! forces stage N on one worker (deepspeed.shard_single_worker)")
    ap.add_argument("--cpus-per-worker", type=float, default=2.0,
                    help="Ray sets the worker's OMP_NUM_THREADS to floor(this)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=None)


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, method=args.method, images=args.images, batch_size=args.batch_size,
               epochs=args.epochs, zero_stages=tuple(args.zero_stages.split(",")),
               cpus_per_worker=args.cpus_per_worker, threads=args.threads, repeats=args.repeats,
               max_length=args.max_length)
