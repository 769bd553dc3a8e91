"""The worker recipe: one training loop for every model family and every method.

Runs inside each Ray Train worker, as named steps (`train_loop` reads as the recipe): `setup` (process group,
model + method, dataset shard, DeepSpeed engine) -> `resume` (or the zero-shot evaluation) -> per epoch
`train_epoch` (`train_step` per micro-batch; the host reads the device only at `train.log_every` steps) ->
`evaluate` (raymed.eval.evaluator) -> `save_and_report`. Only plain data crosses the process boundary: the validated
config, a small plan dict and the driver's absolute paths.
"""

from __future__ import annotations

import os
import random
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raymed.config import Config, with_paths
from raymed.data.padding import token_counts
from raymed.train.engine import Schedule, build_engine, ds_config, zero3_loading
from raymed.models.methods import apply_method
from raymed.models import load_model, load_processor, resolve
from raymed.models.base import enable_activation_checkpointing, enable_drop_path
from raymed.eval.evaluator import Evaluator, read_zero_shot_records, write_evaluation
from raymed.tune.results import answers


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`. `loop_config` = {"config": Config dump, "plan": driver facts, "paths": the
    driver's absolute local paths}."""
    t0 = time.perf_counter()
    run = setup(loop_config)
    run.stats["setup_s"] = time.perf_counter() - t0  # process group, model + method, engine, data shard handle
    progress = resume(run)
    for epoch in range(progress.start_epoch, run.cfg.train.epochs):
        metrics = train_epoch(run, epoch, progress)
        records = evaluate(run, epoch, metrics)
        save_and_report(run, progress, epoch, metrics, records)
    run.tracker.close()


@dataclass
class Run:
    """What every step of the recipe shares: config, plan, this worker's place, the engine and its companions."""

    cfg: Config
    plan: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    nodes: list[str | None]
    ref: Any
    processor: Any
    acc: Any
    engine: Any
    schedule: Schedule
    batches: Any
    evaluator: Evaluator
    telemetry: Any
    tracker: Any
    log: Callable[[str], None]
    micro_batches: int
    steps_per_epoch: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress:
    """Where the run is: restored from the latest checkpoint, or fresh (with the zero-shot scores when asked)."""

    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    zero_shot: dict[str, Any] = field(default_factory=dict)
    zero_shot_records: dict[str, list] = field(default_factory=dict)
    wall_s: float = 0.0
    t_mark: float = 0.0


def setup(loop_config: dict[str, Any]) -> Run:
    """Process group, model + method, the dataset shard, the DeepSpeed engine (raymed.train.engine) and the trackers."""
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()
    cfg = with_paths(Config.model_validate(loop_config["config"]), loop_config["paths"])
    plan = loop_config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    # The recipe never compiles. DeepSpeed's ZeRO optimizer check imports its Muon optimizer, whose torch.compile
    # decorator loads TorchDynamo's and Inductor's compilers (~1.5 CPU-seconds a worker start); disabled here, the
    # decorator is a no-op (a user's own TORCHDYNAMO_DISABLE wins).
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import deepspeed  # after DS_ACCELERATOR is set

    from raymed.data.epochs import EpochBatches
    from raymed.data.plan import optimizer_steps
    from raymed.data.stream import quiet_data_context
    from raymed.telemetry import Telemetry
    from raymed.tracking import RunTracker

    quiet_data_context()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # all_gather_object and NCCL collectives use the current device
    nodes: list[str | None] = [None] * world  # where the workers ran (recorded in every checkpoint)
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    micro_batches = plan["micro_batches"][world]  # an elastic run's world size varies between restarts
    steps_per_epoch = optimizer_steps(micro_batches, cfg.train.grad_accum)
    ref = resolve(cfg.model.name)
    processor = load_processor(ref)
    engine, acc, schedule = build_model_and_engine(cfg, ref, rank, world, steps_per_epoch)
    log = _logger(rank, t_start)
    # This worker's shard of the Ray Data stream, in a seeded order per (seed, epoch); kept in memory after the first
    # epoch when it fits in `data.cache_mb`.
    batches = EpochBatches(ray.train.get_dataset_shard("train"), cfg.train.batch_size, cfg.data.cache_mb, log,
                           seed=cfg.train.seed, shuffle=cfg.data.shuffle, group_by_length=cfg.data.group_by_length)
    log(f"model {ref.name}, method {cfg.method.name}: {acc.trainable:,} trainable of {acc.total:,}; engine ready "
        f"(ZeRO-{engine.zero_optimization_stage()} [asked {cfg.deepspeed.zero_stage}], "
        f"{'bf16' if cfg.bf16 else 'fp32'}, {world} workers)")
    return Run(cfg, plan, rank, world, device, nodes, ref, processor, acc, engine, schedule, batches,
               Evaluator(cfg, ref, processor, engine, plan, rank, world),
               Telemetry.for_train_worker(cfg.method.name, enabled=cfg.run.metrics_export),
               RunTracker.for_worker(cfg, plan, rank, steps_per_epoch * cfg.train.epochs, log),  # train.log_every
               log, micro_batches, steps_per_epoch)


def build_model_and_engine(cfg: Config, ref: Any, rank: int, world: int, steps_per_epoch: int) -> tuple[Any, Any,
                                                                                                        Schedule]:
    """Every rank builds identical weights (same seed), then freezes / wraps them (the method), then the engine:
    AdamW over the trainable parameters only. Weights load in the training precision; under ZeRO-3 an
    HfDeepSpeedConfig alive during `from_pretrained` partitions them as they load, so no rank holds the whole model."""
    ds_cfg = ds_config(cfg, world, cfg.bf16)
    # only for weights loaded from a directory (a preset built from its config with random init would be
    # partitioned before transformers initialises it); kept alive until the engine exists
    hf_ds_config = zero3_loading(ds_cfg, cfg) if ref.path is not None or ref.preset.shipped_dir else None
    model = load_model(ref, seed=cfg.train.seed, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    model, acc = apply_method(model, ref, cfg.method.name, cfg.method.towers, cfg.method.options,
                              seed=cfg.train.seed)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.model.drop_path:
        enable_drop_path(model, cfg.model.drop_path)
    _seed_everything(cfg.train.seed + rank)
    schedule = Schedule.for_run(cfg, steps_per_epoch * cfg.train.epochs, steps_per_epoch)
    engine = build_engine(model, cfg, bf16=cfg.bf16, world=world, schedule=schedule, ds_cfg=ds_cfg)
    del hf_ds_config
    return engine, acc, schedule


def resume(run: Run) -> Progress:
    """The latest checkpoint of this run (a restarted worker group or a re-run of the command): the engine, the
    schedule and every RNG continue exactly where it left them. A fresh run is evaluated zero-shot first."""
    import ray.train

    from raymed.train import elastic
    from raymed.train.checkpoint import load_resume_state

    progress = Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        if run.cfg.train.zero_shot:
            progress.zero_shot, progress.zero_shot_records = run.evaluator.run(prefix="zeroshot")
            run.log("zero-shot evaluation done")
        progress.t_mark = time.perf_counter()
        run.tracker.first_step = run.engine.global_steps  # the ETA counts the steps this process trained
        return progress
    engine = run.engine
    with checkpoint.as_directory() as d:
        state = load_resume_state(engine, Path(d), run.rank, run.cfg)
        progress.zero_shot_records = read_zero_shot_records(Path(d)) if run.rank == 0 else {}
    progress.start_epoch, progress.history, progress.zero_shot = state["epoch"] + 1, state["history"], \
        state["zero_shot"]
    progress.wall_s = state.get("wall_s", 0.0)
    run.schedule.resume(state, run.cfg, run.steps_per_epoch, engine.global_steps, run.log)
    if "resharded_from" in state:  # another world size: weights + optimizer state re-sharded (raymed.train.elastic)
        elastic.sync_lr(engine)
        elastic.reseed(run.cfg.train.seed, run.rank, engine.global_steps)
        was = state["resharded_from"]
        run.log(f"world size changed: checkpoint of {was['world_size']} workers (ZeRO-{was['zero_stage']}) restored "
                f"on {run.world} (ZeRO-{engine.zero_optimization_stage()})")
    run.log(f"resumed after epoch {progress.start_epoch} (step {engine.global_steps})")
    elastic.dump_restored(engine, run.rank, run.world, progress.start_epoch, run.plan["run_name"])  # test hook
    progress.t_mark = time.perf_counter()
    run.tracker.first_step = engine.global_steps
    return progress


def train_epoch(run: Run, epoch: int, progress: Progress) -> dict[str, Any]:
    """One epoch of optimizer steps. Losses and token counts stay on the device: the host reads them at
    `train.log_every` steps and at the epoch's end, so nothing in the step waits for the device. The metrics also say
    where time went (raymed.bench overhead): the wait for the epoch's first batch, the worker's setup, this process's
    CPU seconds in the epoch and its torch threads."""
    engine, stats = run.engine, run.stats
    for key in ("samples", "tokens", "padded_tokens", "train_s"):
        stats.setdefault(key, 0)
    engine.train()
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=run.device), 0
    t0 = first_batch_s = time.perf_counter()
    cpu0 = time.process_time()
    for index, batch in enumerate(run.batches.epoch(epoch)):
        if index == 0:  # the data stream's start-up (Ray Data's on a streamed epoch; none on a replay)
            first_batch_s = time.perf_counter() - first_batch_s
        if index == run.micro_batches:
            raise RuntimeError(f"epoch {epoch + 1}: the data stream gave more than the {run.micro_batches} planned "
                               "micro-batches (the training split changed since the run was planned?)")
        loss_sum += train_step(run, batch, index, t0)
        n += 1
        if n == 1:
            run.log(f"epoch {epoch + 1}: first step done")
    if n != run.micro_batches:
        raise RuntimeError(f"epoch {epoch + 1}: the data stream gave {n} micro-batches, {run.micro_batches} were "
                           "planned (the training split changed since the run was planned?)")
    stats["train_s"] += time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0  # this process's CPU time (all its threads) in the epoch
    seconds = max(stats["train_s"], 1e-9)
    return {
        "epoch": epoch + 1, "step": engine.global_steps, "loss": _mean_across(loss_sum, n),
        "lr": engine.get_lr()[0], "trainable": run.acc.trainable, "total_params": run.acc.total,
        "samples_per_s": stats["samples"] / seconds,
        "tokens_per_s": stats["tokens"] / seconds,  # real (unpadded) tokens
        "padded_tokens_per_s": stats["padded_tokens"] / seconds,
        "padding_fraction": 1 - stats["tokens"] / max(stats["padded_tokens"], 1),
        "peak_mem_mb": _peak_memory_mb(run.device), "data_cached_mb": run.batches.kept_mb,
        "zero_stage": engine.zero_optimization_stage(), "first_batch_s": first_batch_s,
        "setup_s": stats.get("setup_s"), "torch_threads": torch.get_num_threads(), "cpu_s": cpu_s,
        **progress.zero_shot,
    }


def train_step(run: Run, batch: dict[str, Any], index: int, t0: float) -> torch.Tensor:
    """One micro-batch (the optimizer steps at accumulation boundaries): its loss, left on the device. The batch is
    cut to its longest sample (`data.pad_to_multiple_of`) and its tokens counted on the host, before the copy."""
    cfg, engine, stats = run.cfg, run.engine, run.stats
    batch = run.ref.family.cut_padding(run.processor, batch, train=True, multiple=cfg.data.pad_to_multiple_of)
    real, padded = token_counts(batch)
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if cfg.bf16:
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    loss = train_micro_batch(engine, batch, index, run.micro_batches, cfg.train.grad_accum).detach()
    stats["samples"] += batch["input_ids"].shape[0] * run.world
    stats["tokens"] += real * run.world
    stats["padded_tokens"] += padded * run.world
    if engine.is_gradient_accumulation_boundary():
        _maybe_inject_fault(cfg, run.plan, engine.global_steps, run.rank, run.world)
        log_step(run, loss, time.perf_counter() - t0 + stats["train_s"])
    return loss


def log_step(run: Run, loss: torch.Tensor, train_s: float) -> None:
    """At `train.log_every` optimizer steps only: read the step's loss and the token count from the device, print
    and track them (run.report_to) and update the dashboard metrics."""
    step, every = run.engine.global_steps, run.cfg.train.log_every
    if every <= 0 or step % every:
        return
    lr, value = run.engine.get_lr()[0], float(loss)
    run.telemetry.step(value, lr, run.stats, train_s, run.acc.trainable)
    run.tracker.step(step, value, lr, run.stats, train_s)


def evaluate(run: Run, epoch: int, metrics: dict[str, Any]) -> dict[str, list]:
    """Every `train.eval_every` epochs and after the last: scores into `metrics`; rank 0 gets the predictions."""
    records: dict[str, list] = {}
    if (epoch + 1) % run.cfg.train.eval_every == 0 or epoch + 1 == run.cfg.train.epochs:
        evaluated, records = run.evaluator.run(prefix="eval")
        metrics.update(evaluated)
    run.log(f"epoch {epoch + 1}: step {metrics['step']}, loss {metrics['loss']:.4f}, "
            f"{metrics['samples_per_s']:.1f} samples/s")
    return records


def save_and_report(run: Run, progress: Progress, epoch: int, metrics: dict[str, Any], records: dict[str, list]) -> None:
    """The epoch's checkpoint (engine state, trainable weights, RNG, schedule; on rank 0 the result row and the
    predictions) handed to Ray Train with the epoch's metrics: one report per epoch."""
    import ray.train

    from raymed.train.checkpoint import save_checkpoint

    correct = answers(records, "eval")  # rank 0: which questions each eval set got right (for paired tests)
    progress.history.append({**{k: v for k, v in metrics.items() if not k.startswith("zeroshot/")},
                             "worker_nodes": run.nodes, **({"answers": correct} if correct else {})})
    run.tracker.epoch(metrics)
    now = time.perf_counter()
    progress.wall_s += now - progress.t_mark
    progress.t_mark = now
    name = f"epoch-{epoch + 1:04d}"
    cfg = run.cfg
    with tempfile.TemporaryDirectory() as tmp:
        last = epoch + 1 == cfg.train.epochs
        state = {"epoch": epoch, "history": progress.history, "zero_shot": progress.zero_shot,
                 "wall_s": progress.wall_s, "schedule": run.schedule.segments, "worker_nodes": run.nodes}
        save_checkpoint(run.engine, run.acc, cfg, Path(tmp), run.rank, state, full=cfg.run.save_full_model and last,
                        portable=cfg.scaling.elastic)
        if run.rank == 0:
            write_evaluation(Path(tmp), cfg, run.acc, progress.history, progress.zero_shot,
                             progress.zero_shot_records, records, progress.wall_s, name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def train_micro_batch(engine: Any, batch: dict[str, torch.Tensor], index: int, micro_batches: int,
                      grad_accum: int) -> torch.Tensor:
    """Forward and backward of micro-batch `index` of an epoch of `micro_batches`; the optimizer steps at the end of
    each group of `grad_accum` and at the epoch's last micro-batch. A shorter last group's gradient is the mean over
    its micro-batches, as a full group's is. Returns the micro-batch's loss."""
    start = index - index % grad_accum
    group = min(grad_accum, micro_batches - start)
    engine.set_gradient_accumulation_boundary(index + 1 == start + group)
    loss = engine(**batch).loss
    engine.backward(loss * (grad_accum / group) if group < grad_accum else loss)  # DeepSpeed divides by grad_accum
    engine.step()
    return loss


def _maybe_inject_fault(cfg: Config, plan: dict, step: int, rank: int, world: int) -> None:
    """Test hook: the last worker dies once (hard exit) at `run.fail_at_step`."""
    if cfg.run.fail_at_step is None or step != cfg.run.fail_at_step or rank != world - 1:
        return
    from raymed import storage

    marker = plan["fault_marker"]  # a path or URI under the run storage
    if storage.exists(marker):
        return
    storage.write_text(marker, f"worker {rank} killed at step {step}\n")
    # Ray Train's controller records a report (and its checkpoint) when it next polls the workers (every 2 s): a
    # delay makes the last checkpoint before the fault the one a re-run resumes from (tests of resumes rely on it).
    time.sleep(float(os.environ.get("RAYMED_FAULT_DELAY_S", "0")))
    os._exit(17)


def _logger(rank: int, t_start: float) -> Any:
    def log(msg: str) -> None:
        if rank == 0:
            print(f"[raymed +{time.perf_counter() - t_start:.1f}s] {msg}", flush=True)

    return log


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mean_across(total: torch.Tensor, n: int) -> float:
    """The mean over all ranks of `n` values summing to `total` (a device tensor): one collective, one host read."""
    t = torch.stack([total.to(torch.float64), torch.tensor(float(n), dtype=torch.float64, device=total.device)])
    dist.all_reduce(t)
    return float(t[0] / max(float(t[1]), 1.0))


def _peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or this process's peak RSS on CPU; max over ranks."""
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = torch.tensor([mb], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])
