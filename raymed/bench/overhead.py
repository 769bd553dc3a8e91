"""Suite `overhead`: raymed's recipe (Ray Train, 1 worker, DeepSpeed) vs a plain PyTorch loop.

Same model, method, settings (`train.*` of the recipe's config: AdamW with the same groups, decay and learning
rate, fused kernel; clipping at `train.max_grad_norm`; warm-up + cosine), the same CPU threads, and **the same
batches**: the plain loop holds the training split encoded in memory and gives every epoch exactly the batches a
worker that kept its shard gives (`EpochBatches.in_memory`: the order seeded by `(train.seed, epoch)`, each batch cut
to its longest sample by `Family.cut_padding`). The plain loop is the limit: each epoch's batches are built before its
clock starts; the worker takes and cuts them inside its epoch (work a real run does). Checked, not assumed: the worker
reports its torch threads, and both sides' padding fraction (cumulative over the epochs: a function of the batch
shapes) must agree.

Throughput is the *last* epoch of each run (steady state): the worker reports cumulative samples/s per epoch, from
which each epoch's own rate follows. Start-up is reported apart: the worker's `setup` (process group, model, engine),
the data stream's first batch, the first epoch, and the rest of the `fit` call (Ray Train's controller and worker
group, evaluation, checkpoints). Rounds alternate which side runs first; ratios are paired per round, median.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

from raymed.tables import table

from raymed.bench.common import (
    BENCH_MODEL, default_max_length, encoded_batches, fit_model_name, header, median, model_ref, ratio, result, spread,
    synth_data, target, targets_table,
)


def recipe_config(model_dir: str, method: str, images: int, max_length: int, batch_size: int, epochs: int, lr: float,
                  setup: str = "2", cpus_per_worker: float = 2.0, storage: str = "", name: str = "overhead") -> Any:
    """The `fit` config of one recipe run; the plain loop takes its `train.*` settings from the same config."""
    from raymed.config import load_config

    zero_stage, forced = parse_setup(setup)
    return load_config(None, {
        "model.name": model_dir, "method.name": method, "data.synth_n": images, "data.max_length": max_length,
        "data.synth_ood_style": None, "data.max_eval_rows": 1, "train.epochs": epochs, "train.batch_size": batch_size,
        "train.lr": lr, "train.zero_shot": False, "train.eval_every": epochs, "train.eval_batch_size": 1,
        "train.max_new_tokens": 1, "scaling.num_workers": 1, "scaling.cpus_per_worker": cpus_per_worker,
        "deepspeed.zero_stage": zero_stage, "deepspeed.shard_single_worker": forced, "run.storage": storage or "runs",
        "run.name": name, "run.metrics_export": False, "run.keep_checkpoints": 1,
    })


def plain_loop(model_name: str, method: str, rows: dict[str, Any], cfg: Any, threads: int) -> dict[str, Any]:
    """Train in-process on the worker's batches (`rows`: the training split, encoded, uncut); seconds per epoch."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from raymed.data.epochs import EpochBatches
    from raymed.data.padding import token_counts
    from raymed.models.methods import apply_method
    from raymed.models import load_model, load_processor

    t = cfg.train
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        ref = model_ref(model_name)
        processor = load_processor(ref)
        model, acc = apply_method(load_model(ref, seed=t.seed), ref, method)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        plain = [p for p in trainable if p.ndim < 2 and not t.decay_norms_and_biases]  # norms and biases
        decay = [p for p in trainable if not any(p is q for q in plain)]
        groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay}, {"params": plain, "weight_decay": 0.0})
                  if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=t.lr, fused=True)  # the recipe's optimizer (raymed.train.engine)
        source = EpochBatches.in_memory(rows, t.batch_size, seed=t.seed, shuffle=cfg.data.shuffle)
        steps = -(-int(rows["input_ids"].shape[0]) // t.batch_size)
        total = t.epochs * steps
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(t.warmup_ratio * total), total)
        build_s = time.perf_counter() - t0
        epoch_s, cpu_s, losses, tokens, padded = [], [], [], 0, 0
        for epoch in range(t.epochs):
            batches = [{k: v for k, v in ref.family.cut_padding(processor, b, train=True,
                                                                multiple=cfg.data.pad_to_multiple_of).items()
                        if isinstance(v, torch.Tensor)} for b in source.epoch(epoch)]
            for b in batches:
                real, pad = token_counts(b)
                tokens, padded = tokens + real, padded + pad
            t0, cpu0 = time.perf_counter(), time.process_time()
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            epoch_s.append(time.perf_counter() - t0)
            cpu_s.append(time.process_time() - cpu0)
    finally:
        torch.set_num_threads(prev)
    samples = int(rows["input_ids"].shape[0])
    return {"epoch_s": epoch_s, "cpu_s": cpu_s, "samples_per_epoch": samples, "samples_per_s": samples / epoch_s[-1],
            "build_s": build_s, "trainable": acc.trainable, "threads": threads,
            "padding_fraction": 1 - tokens / max(padded, 1),
            "loss_first_last": [float(losses[0]), float(losses[-1])]}


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


def raymed_run(cfg: Any) -> dict[str, Any]:
    """One `fit` with 1 Ray Train worker: per-epoch rates, and where the rest of the call's wall time went."""
    from raymed.data.plan import data_plan
    from raymed.data.prepare import read_manifest
    from raymed.train.launch import fit

    t0 = time.time()
    summary = fit(cfg)
    wall = time.time() - t0
    rows = read_manifest(data_plan(cfg)[0])["splits"]["train"]["rows"]
    history = summary["history"]
    rates = epoch_rates(history, rows)
    epoch_s = [rows / r for r in rates]
    setup_s = history[0].get("setup_s") or 0.0
    return {"zero_stage": cfg.deepspeed.zero_stage, "ran_stage": history[-1].get("zero_stage"),
            "cpus_per_worker": cfg.scaling.cpus_per_worker, "torch_threads": history[-1].get("torch_threads"),
            "epoch_rates": rates, "epoch_s": epoch_s, "cpu_s": [h.get("cpu_s") for h in history],
            "samples_per_s": rates[-1], "samples_per_epoch": rows,
            "wall_s": wall, "train_s": sum(epoch_s), "outside_training_s": wall - sum(epoch_s),
            "startup": {"worker_setup_s": setup_s, "first_batch_s": [h.get("first_batch_s") for h in history],
                        "first_epoch_s": epoch_s[0],
                        "rest_s": wall - setup_s - sum(epoch_s)},  # Ray Train controller + workers, eval, checkpoints
            "trainable": summary["params"]["trainable"], "losses": [h["loss"] for h in history],
            "padding_fraction": history[-1].get("padding_fraction")}


def run(model: str = BENCH_MODEL, method: str = "full", images: int = 14, batch_size: int = 4, epochs: int = 2,
        lr: float = 1e-4, zero_stages: tuple[str, ...] = ("0", "2", "2!"), cpus_per_worker: float = 2.0,
        threads: int = 2, repeats: int = 1, max_length: int | None = None) -> dict[str, Any]:
    import ray

    from raymed.cluster import init_ray, required_cpus
    from raymed.models import load_processor

    started = time.time()
    if epochs < 2:
        raise ValueError("overhead: epochs must be >= 2 (the first epoch is warm-up)")
    ref = model_ref(model)
    max_length = max_length or default_max_length(ref, load_processor(ref))
    data_dir = synth_data(images)  # the directory `fit` generates for data.synth_n=images
    t0 = time.perf_counter()
    import torch

    batches = encoded_batches(model, data_dir, "train", batch_size, max_length, cut=False)
    rows = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}  # the split, as a worker keeps its shard
    encode_s = time.perf_counter() - t0
    model_dir = fit_model_name(model)
    base = recipe_config(model_dir, method, images, max_length, batch_size, epochs, lr, "2", cpus_per_worker)
    config = {"model": model, "model_dir": model_dir, "method": method, "images": images,
              "train_rows": int(rows["input_ids"].shape[0]), "batch_size": batch_size,
              "max_length": max_length, "epochs": epochs, "zero_stages": list(zero_stages),
              "cpus_per_worker": cpus_per_worker, "threads": threads, "repeats": repeats,
              "plain_encode_s": encode_s, "driver_torch_threads": torch.get_num_threads()}
    started_ray = not ray.is_initialized()
    init_ray(required_cpus(base) + 1)
    plains, runs, loads = [], {s: [] for s in zero_stages}, []
    try:
        with tempfile.TemporaryDirectory(prefix="raymed-bench-overhead-") as storage:
            for r in range(repeats):
                order = ["plain", *zero_stages]
                for side in order if r % 2 == 0 else order[::-1]:  # alternate which side runs first
                    if side == "plain":
                        plains.append(plain_loop(model, method, rows, base, threads))
                        label, rate, wall = "plain", plains[-1]["samples_per_s"], None
                    else:
                        cfg = recipe_config(model_dir, method, images, max_length, batch_size, epochs, lr, side,
                                            cpus_per_worker, storage, f"overhead-z{side}-r{r}")
                        out = {**raymed_run(cfg), "setup": side, "round": r}
                        runs[side].append(out)
                        label, rate, wall = setup_label(side), out["samples_per_s"], out["wall_s"]
                    loads.append(os.getloadavg()[0])
                    print(f"[bench overhead] round {r + 1}: {label} {rate:.3f} samples/s"
                          + (f" (wall {wall:.0f} s)" if wall else ""), flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    config["load_1min_during"] = spread(loads)
    rows_out, targets = summarize(plains, runs, batch_size)
    return result("overhead", config, rows_out, targets, started, plain=plains,
                  raymed={str(k): v for k, v in runs.items()})


def summarize(plains: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]],
              batch_size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (plain loop, then each setup: median rate, per-round paired ratios) and the targets. `cores_busy`: the
    training process's CPU seconds over the last epoch's wall seconds (what it got of the machine)."""
    plain_rate = median([p["samples_per_s"] for p in plains])
    steps = -(-plains[0]["samples_per_epoch"] // batch_size)
    rows = [{"setup": "plain PyTorch loop", "samples_per_s": plain_rate, "ratio": 1.0,
             "step_s": batch_size / plain_rate,
             "threads": plains[0]["threads"], "wall_s": None, "outside_training_s": None,
             "cores_busy": median([p["cpu_s"][-1] / p["epoch_s"][-1] for p in plains]),
             "cpu_s_per_step": median([p["cpu_s"][-1] for p in plains]) / steps,
             "padding_fraction": plains[0]["padding_fraction"]}]
    targets = []
    for s, outs in runs.items():
        ratios = [ratio(o["samples_per_s"], plains[o["round"]]["samples_per_s"]) for o in outs]
        rate = median([o["samples_per_s"] for o in outs])
        stage, forced = parse_setup(s)
        same = all(o["padding_fraction"] is not None and abs(o["padding_fraction"] - plains[0]["padding_fraction"])
                   < 1e-9 for o in outs)
        rows.append({"setup": setup_label(s), "zero_stage": stage, "ran_stage": outs[0]["ran_stage"],
                     "samples_per_s": rate, "ratio": median(ratios), "ratio_rounds": ratios,
                     "step_s": batch_size / rate, "threads": outs[0]["torch_threads"], "same_batches": same,
                     "cores_busy": median([o["cpu_s"][-1] / o["epoch_s"][-1] for o in outs]),
                     "cpu_s_per_step": median([o["cpu_s"][-1] for o in outs]) / steps,
                     "padding_fraction": outs[0]["padding_fraction"],
                     "wall_s": median([o["wall_s"] for o in outs]),
                     "outside_training_s": median([o["outside_training_s"] for o in outs]),
                     "worker_setup_s": median([o["startup"]["worker_setup_s"] for o in outs]),
                     "first_batch_s": median([o["startup"]["first_batch_s"][0] for o in outs]),
                     "first_epoch_s": median([o["startup"]["first_epoch_s"] for o in outs]),
                     "rest_s": median([o["startup"]["rest_s"] for o in outs])})
        if not forced:  # the targets are about what raymed runs; forced stages are for reference
            targets.append(target(f"raymed ZeRO-{s} / plain loop", median(ratios), 0.95, ">=",
                                  f"samples/s of the last epoch, paired per round; ran stage {outs[0]['ran_stage']}; "
                                  f"same batches: {same}; threads {outs[0]['torch_threads']} vs "
                                  f"{plains[0]['threads']}"))
    return rows, targets


COLUMNS = [("setup", "setup"), ("ran_stage", "ran stage"), ("threads", "threads"), ("samples_per_s", "samples/s"),
           ("ratio", "x plain"), ("step_s", "s/step"), ("cpu_s_per_step", "CPU s/step"), ("cores_busy", "cores busy"),
           ("wall_s", "wall s"), ("worker_setup_s", "worker setup s"),
           ("first_batch_s", "first batch s"), ("first_epoch_s", "epoch 1 s"), ("rest_s", "rest s")]


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
