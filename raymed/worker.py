"""The worker recipe: one training loop for every model family and every method.

Runs inside each Ray Train worker and reads top to bottom: build model -> apply method (before the
engine) -> dataset shard -> DeepSpeed engine -> resume -> [zero-shot eval] -> train / eval / checkpoint
-> report. Only plain data crosses the process boundary: the validated config and a small plan dict.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import Config, with_paths
from .data.plan import eval_split_of
from .engine import Schedule, build_engine, ds_config, zero3_loading
from .methods import apply_method
from .models import load_model, load_processor, resolve
from .models.base import enable_activation_checkpointing, enable_drop_path
from .results import answers


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`. `loop_config` = {"config": Config dump, "plan": driver facts}."""
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()

    cfg = with_paths(Config.model_validate(loop_config["config"]), loop_config["paths"])
    plan = loop_config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import deepspeed  # after DS_ACCELERATOR is set

    from . import elastic
    from .checkpoint import load_resume_state, save_checkpoint
    from .data.epochs import EpochBatches
    from .data.plan import optimizer_steps
    from .data.stream import quiet_data_context
    from .telemetry import Telemetry
    from .tracking import RunTracker

    quiet_data_context()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # all_gather_object and NCCL collectives use the current device
    # Ray node id of every rank (recorded in each checkpoint's state.json: where the workers ran).
    nodes: list[str | None] = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    bf16 = cfg.bf16

    # 1. Model and method. Every rank builds identical weights (same seed), then freezes / wraps. Weights load in
    # the training precision; under ZeRO-3 an HfDeepSpeedConfig alive during from_pretrained makes transformers
    # partition them as they load (deepspeed.zero.Init), so no rank holds the whole model.
    ref = resolve(cfg.model.name)
    processor = load_processor(ref)
    micro_batches = plan["micro_batches"][world]  # an elastic run's world size varies between restarts
    steps_per_epoch = optimizer_steps(micro_batches, cfg.train.grad_accum)
    total_steps = steps_per_epoch * cfg.train.epochs
    ds_cfg = ds_config(cfg, world, bf16)
    # keep alive until the engine exists; only for weights loaded from a directory (a preset built from its config
    # with random init would be partitioned before transformers initialises it)
    hf_ds_config = zero3_loading(ds_cfg, cfg) if ref.path is not None or ref.preset.shipped_dir else None
    model = load_model(ref, seed=cfg.train.seed, dtype=torch.bfloat16 if bf16 else torch.float32)
    model, acc = apply_method(model, ref, cfg.method.name, cfg.method.towers, cfg.method.options,
                              seed=cfg.train.seed)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.model.drop_path:
        enable_drop_path(model, cfg.model.drop_path)
    _seed_everything(cfg.train.seed + rank)

    # 2. Data: this worker's shard of the Ray Data stream (decoded + encoded in the stream), in a seeded order
    # per (seed, epoch); kept in memory after the first epoch when it fits in `data.cache_mb`.
    log = _logger(rank, t_start)
    batches = EpochBatches(ray.train.get_dataset_shard("train"), cfg.train.batch_size, cfg.data.cache_mb, log,
                           seed=cfg.train.seed, shuffle=cfg.data.shuffle)

    # 3. Engine (raymed.engine): optimizer over trainable parameters only; frozen ones get no grads and no state.
    schedule = Schedule.for_run(cfg, total_steps, steps_per_epoch)
    engine = build_engine(model, cfg, bf16=bf16, world=world, schedule=schedule, ds_cfg=ds_cfg)
    del hf_ds_config
    telemetry = Telemetry.for_train_worker(cfg.method.name, enabled=cfg.run.metrics_export)
    tracker = RunTracker.for_worker(cfg, plan, rank, total_steps, log)  # run.report_to, train.log_every
    log(f"model {ref.name}, method {cfg.method.name}: {acc.trainable:,} trainable of {acc.total:,}; engine ready "
        f"(ZeRO-{engine.zero_optimization_stage()} [asked {cfg.deepspeed.zero_stage}], {'bf16' if bf16 else 'fp32'}, "
        f"{world} workers)")

    # 4. Resume: the latest checkpoint of this run (a restarted worker group or a re-run of the command). The
    # engine, the schedule and every RNG continue exactly where the checkpoint left them.
    start_epoch, history, zero_shot, zero_shot_records, wall_s = 0, [], {}, {}, 0.0
    checkpoint = ray.train.get_checkpoint()
    evaluator = Evaluator(cfg, ref, processor, engine, plan, rank, world)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_resume_state(engine, Path(d), rank, cfg)
            zero_shot_records = read_zero_shot_records(Path(d)) if rank == 0 else {}
        start_epoch, history, zero_shot = state["epoch"] + 1, state["history"], state["zero_shot"]
        wall_s = state.get("wall_s", 0.0)
        schedule.resume(state, cfg, steps_per_epoch, engine.global_steps, log)
        if "resharded_from" in state:  # another world size: weights + optimizer state re-sharded (raymed.elastic)
            elastic.sync_lr(engine)
            elastic.reseed(cfg.train.seed, rank, engine.global_steps)
            was = state["resharded_from"]
            log(f"world size changed: checkpoint of {was['world_size']} workers (ZeRO-{was['zero_stage']}) restored "
                f"on {world} (ZeRO-{engine.zero_optimization_stage()})")
        log(f"resumed after epoch {start_epoch} (step {engine.global_steps})")
        elastic.dump_restored(engine, rank, world, start_epoch, plan["run_name"])  # test hook (RAYMED_RESTORE_DUMP)
    elif cfg.train.zero_shot:
        zero_shot, zero_shot_records = evaluator.run(prefix="zeroshot")
        log("zero-shot evaluation done")
    t_mark = time.perf_counter()

    # 5. Train, evaluate, checkpoint, report: one report (with checkpoint) per epoch.
    stats = {"samples": 0, "tokens": 0, "train_s": 0.0}
    for epoch in range(start_epoch, cfg.train.epochs):
        engine.train()
        losses = []
        t0 = time.perf_counter()
        for index, batch in enumerate(batches.epoch(epoch)):
            if index == micro_batches:
                raise RuntimeError(f"epoch {epoch + 1}: the data stream gave more than the {micro_batches} planned "
                                   "micro-batches (the training split changed since the run was planned?)")
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if bf16:
                batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
            loss = train_micro_batch(engine, batch, index, micro_batches, cfg.train.grad_accum)
            losses.append(loss.item())
            if len(losses) == 1:
                log(f"epoch {epoch + 1}: first step done")
            stats["samples"] += batch["input_ids"].shape[0] * world
            stats["tokens"] += int(batch["attention_mask"].sum()) * world
            if not engine.is_gradient_accumulation_boundary():
                continue
            _maybe_inject_fault(cfg, plan, engine.global_steps, rank, world)
            telemetry.step(loss.item(), engine.get_lr()[0], stats, time.perf_counter() - t0 + stats["train_s"],
                           acc.trainable)
            tracker.step(engine.global_steps, loss.item(), engine.get_lr()[0], stats,
                         time.perf_counter() - t0 + stats["train_s"])
        if len(losses) != micro_batches:
            raise RuntimeError(f"epoch {epoch + 1}: the data stream gave {len(losses)} micro-batches, "
                               f"{micro_batches} were planned (the training split changed since the run was planned?)")
        stats["train_s"] += time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": engine.global_steps,
            "loss": _mean_across(losses, device),
            "lr": engine.get_lr()[0],
            "trainable": acc.trainable,
            "total_params": acc.total,
            "samples_per_s": stats["samples"] / max(stats["train_s"], 1e-9),
            "tokens_per_s": stats["tokens"] / max(stats["train_s"], 1e-9),
            "peak_mem_mb": _peak_memory_mb(device),
            "data_cached_mb": batches.kept_mb,
            "zero_stage": engine.zero_optimization_stage(),
            **zero_shot,
        }
        records: dict[str, list] = {}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            evaluated, records = evaluator.run(prefix="eval")
            metrics.update(evaluated)
        log(f"epoch {epoch + 1}: step {metrics['step']}, loss {metrics['loss']:.4f}, "
            f"{metrics['samples_per_s']:.1f} samples/s")
        correct = answers(records, "eval")  # rank 0: which questions each eval set got right (for paired tests)
        history.append({**{k: v for k, v in metrics.items() if not k.startswith("zeroshot/")}, "worker_nodes": nodes,
                        **({"answers": correct} if correct else {})})
        tracker.epoch(metrics)
        wall_s += time.perf_counter() - t_mark
        t_mark = time.perf_counter()
        name = f"epoch-{epoch + 1:04d}"
        with tempfile.TemporaryDirectory() as tmp:
            last = epoch + 1 == cfg.train.epochs
            state = {"epoch": epoch, "history": history, "zero_shot": zero_shot, "wall_s": wall_s,
                     "schedule": schedule.segments, "worker_nodes": nodes}
            save_checkpoint(engine, acc, cfg, Path(tmp), rank, state, full=cfg.run.save_full_model and last,
                            portable=cfg.scaling.elastic)
            if rank == 0:
                write_evaluation(Path(tmp), cfg, acc, history, zero_shot, zero_shot_records, records, wall_s, name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    tracker.close()


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


class Evaluator:
    """Generates answers on every eval set, whole batches handed out across ranks; rank 0 gathers and scores them."""

    def __init__(self, cfg: Config, ref: Any, processor: Any, engine: Any, plan: dict, rank: int, world: int):
        self.cfg, self.ref, self.processor, self.engine = cfg, ref, processor, engine
        self.sets: dict[str, str] = plan["eval_sets"]  # name -> prepared data directory
        self.rank, self.world = rank, world

    def run(self, prefix: str) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        """(`{prefix}/{set}/{metric}` -> value, set -> prediction records [rank 0 only; empty elsewhere])."""
        out: dict[str, float] = {}
        records: dict[str, list[dict[str, Any]]] = {}
        for name, data_dir in self.sets.items():
            metrics, records[name] = self.evaluate(data_dir, eval_split_of(self.cfg, name))
            out.update({f"{prefix}/{name}/{k}": v for k, v in metrics.items()})
        return out, records

    @torch.no_grad()
    def evaluate(self, data_dir: str, split: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
        from . import predict
        from .data.rows import read_rows

        cfg = self.cfg
        self.engine.eval()
        rows = read_rows(data_dir, split)[: cfg.data.max_eval_rows]
        if not rows:
            raise RuntimeError(f"{data_dir}: eval split {split!r} has no rows")
        # The batches are cut from the rows in order and handed out whole (batch k to rank k mod world): every batch
        # is the same whatever the number of workers, so a checkpoint answers as `raymed eval` answers with it.
        bs = predict.eval_batch_size(self.ref.family, self.processor, cfg)
        batches = [rows[i:i + bs] for i in range(0, len(rows), bs)]
        mine = [row for batch in batches[self.rank :: self.world] for row in batch]
        model = self.engine.module
        kwargs = {"synced_gpus": True} if self.engine.zero_optimization_stage() == 3 and self.world > 1 else {}
        predicted = predict.answer(model, self.ref.family, self.processor, cfg, mine, batch_size=bs,
                                   n_batches=math.ceil(len(batches) / self.world),  # ZeRO-3: lock-step generate
                                   bf16=self.engine.bfloat16_enabled(), filler=rows[0], **kwargs)
        # Rank 0 gathers the answers and scores them (one METEOR / Java process, not one per rank); every rank gets
        # the metrics (or rank 0's error) back, so all report the same.
        gathered: list[dict[str, str]] | None = [{} for _ in range(self.world)] if self.rank == 0 else None
        dist.gather_object({r["id"]: a for r, a in zip(mine, predicted)}, gathered, dst=0)
        result: list[Any] = [None]
        if self.rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            lost = [r["id"] for r in rows if r["id"] not in merged]
            preds = [merged.get(r["id"], "") for r in rows]
            result = [f"evaluation lost rows: {len(lost)} of {len(rows)} have no prediction ({lost[:3]})" if lost
                      else predict.score(rows, preds)]
        dist.broadcast_object_list(result, src=0)
        if isinstance(result[0], str):
            raise RuntimeError(result[0])
        return result[0], (predict.records(rows, preds) if self.rank == 0 else [])


def write_evaluation(ckpt: Path, cfg: Config, acc: Any, history: list[dict[str, Any]], zero_shot: dict[str, Any],
                     zero_shot_records: dict[str, list], records: dict[str, list], wall_s: float, name: str) -> None:
    """Rank 0: the run's result row and the epoch's predictions (and the zero-shot ones) into the checkpoint."""
    from . import predict
    from .results import ROW_FILE, result_row

    row = result_row(cfg, acc.to_dict(), history, zero_shot=zero_shot, wall_s=wall_s, checkpoint=name,
                     zero_shot_answers=answers(zero_shot_records, "zeroshot"))
    (ckpt / ROW_FILE).write_text(json.dumps(row, indent=2))
    for prefix, sets, metrics in (("zeroshot", zero_shot_records, zero_shot), ("eval", records, history[-1])):
        for set_name, recs in sets.items():
            scores = {k.rsplit("/", 1)[-1]: v for k, v in metrics.items() if k.startswith(f"{prefix}/{set_name}/")}
            predict.write(ckpt / prefix / set_name, recs, scores)


def read_zero_shot_records(ckpt: Path) -> dict[str, list[dict[str, Any]]]:
    """The zero-shot predictions a checkpoint carries (so every later checkpoint carries them too)."""
    from . import predict

    root = ckpt / "zeroshot"
    return {d.name: predict.read(d) for d in sorted(root.iterdir())} if root.is_dir() else {}


def _maybe_inject_fault(cfg: Config, plan: dict, step: int, rank: int, world: int) -> None:
    """Test hook: the last worker dies once (hard exit) at `run.fail_at_step`."""
    if cfg.run.fail_at_step is None or step != cfg.run.fail_at_step or rank != world - 1:
        return
    from . import storage

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


def _mean_across(values: list[float], device: torch.device) -> float:
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / max(t[1], 1))


def _peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or this process's peak RSS on CPU; max over ranks."""
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = torch.tensor([mb], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])
