"""The worker recipe: one training loop for every model family and every method.

Runs inside each Ray Train worker and reads top to bottom: build model -> apply method (before the
engine) -> dataset shard -> DeepSpeed engine -> resume -> [zero-shot eval] -> train / eval / checkpoint
-> report. Only plain data crosses the process boundary: the validated config and a small plan dict.
"""

from __future__ import annotations

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

from .config import Config
from .methods import apply_method
from .models import load_model, load_processor, resolve
from .models.base import enable_activation_checkpointing


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`. `loop_config` = {"config": Config dump, "plan": driver facts}."""
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()

    cfg = Config.model_validate(loop_config["config"])
    plan = loop_config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import deepspeed  # after DS_ACCELERATOR is set

    from .checkpoint import load_resume_state, save_checkpoint
    from .data.stream import quiet_data_context
    from .telemetry import Telemetry

    quiet_data_context()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    device = ray.train.torch.get_device()
    # Ray node id of every rank (recorded in each checkpoint's state.json: where the workers ran).
    nodes: list[str | None] = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    bf16 = cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and cfg.scaling.use_gpu)

    # 1. Model and method. Every rank builds identical weights (same seed), then freezes / wraps.
    ref = resolve(cfg.model.name)
    processor = load_processor(ref)
    model = load_model(ref, seed=cfg.train.seed)
    model, acc = apply_method(model, ref, cfg.method.name, cfg.method.towers, cfg.method.options,
                              seed=cfg.train.seed)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    _seed_everything(cfg.train.seed + rank)

    # 2. Data: this worker's shard of the Ray Data stream (decoded + encoded in the stream), kept in memory
    # after the first epoch when it fits in `data.cache_mb`.
    log = _logger(rank, t_start)
    batches = EpochBatches(ray.train.get_dataset_shard("train"), cfg.train.batch_size, cfg.data.cache_mb, log)

    # 3. Engine: optimizer over trainable parameters only; frozen ones get no grads and no state.
    steps_per_epoch = plan["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.train.epochs
    engine = _engine(deepspeed, model, cfg, bf16, total_steps, world)
    telemetry = Telemetry(plan["run_name"], cfg.method.name, enabled=cfg.run.metrics_export)
    log(f"model {ref.name}, method {cfg.method.name}: {acc.trainable:,} trainable of {acc.total:,}; engine ready "
        f"(ZeRO-{engine.zero_optimization_stage()} [asked {cfg.deepspeed.zero_stage}], {'bf16' if bf16 else 'fp32'}, "
        f"{world} workers)")

    # 4. Resume: the latest checkpoint of this run (a restarted worker group or a re-run of the command).
    start_epoch, history, zero_shot = 0, [], {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_resume_state(engine, Path(d), rank)
        start_epoch, history, zero_shot = state["epoch"] + 1, state["history"], state["zero_shot"]
        _seed_everything(cfg.train.seed + rank + 1000 * start_epoch)

    evaluator = Evaluator(cfg, ref, processor, engine, plan, rank, world)
    if cfg.train.zero_shot and checkpoint is None:
        zero_shot = {k.replace("eval/", "zeroshot/", 1): v for k, v in evaluator.run().items()}
        log("zero-shot evaluation done")

    # 5. Train, evaluate, checkpoint, report: one report (with checkpoint) per epoch.
    stats = {"samples": 0, "tokens": 0, "train_s": 0.0}
    for epoch in range(start_epoch, cfg.train.epochs):
        engine.train()
        losses = []
        t0 = time.perf_counter()
        for batch in batches.epoch():
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if bf16:
                batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            if len(losses) == 1:
                log(f"epoch {epoch + 1}: first step done")
            stats["samples"] += batch["input_ids"].shape[0] * world
            stats["tokens"] += int(batch["attention_mask"].sum()) * world
            _maybe_inject_fault(cfg, plan, engine.global_steps, rank, world)
            telemetry.step(loss.item(), engine.get_lr()[0], stats, time.perf_counter() - t0 + stats["train_s"],
                           acc.trainable)
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
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            metrics.update(evaluator.run())
        log(f"epoch {epoch + 1}: step {metrics['step']}, loss {metrics['loss']:.4f}, "
            f"{metrics['samples_per_s']:.1f} samples/s")
        history.append({**{k: v for k, v in metrics.items() if not k.startswith("zeroshot/")}, "worker_nodes": nodes})
        with tempfile.TemporaryDirectory() as tmp:
            last = epoch + 1 == cfg.train.epochs
            save_checkpoint(engine, acc, cfg, Path(tmp), rank,
                            {"epoch": epoch, "history": history, "zero_shot": zero_shot, "worker_nodes": nodes},
                            full=cfg.run.save_full_model and last)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch-{epoch + 1:04d}")


class EpochBatches:
    """A worker's training batches, epoch after epoch.

    The first epoch streams this worker's Ray Data shard. While the batches fit in `limit_mb` MiB they are also
    kept, and every later epoch replays them in the same order: no restart of the Ray Data pipeline (seconds
    of start-up per epoch), no second decode competing with training for the same cores. A shard over the
    limit (or `limit_mb=0`) streams every epoch, exactly as before.
    """

    def __init__(self, shard: Any, batch_size: int, limit_mb: int, log: Any) -> None:
        self.shard, self.batch_size, self.limit, self.log = shard, batch_size, limit_mb << 20, log
        self.kept: list[dict[str, Any]] | None = None
        self.kept_mb = 0.0
        self.stream_always = limit_mb == 0

    def epoch(self) -> Any:
        from .data.stream import torch_batches

        if self.kept is not None:
            yield from self.kept
            return
        keep: list[dict[str, Any]] | None = None if self.stream_always else []
        size = 0
        for batch in torch_batches(self.shard, self.batch_size, drop_last=False):
            if keep is not None:
                size += sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
                if size > self.limit:
                    keep, self.stream_always = None, True
                    self.log(f"training shard exceeds data.cache_mb={self.limit >> 20}: streaming every epoch")
                else:
                    keep.append(batch)
            yield batch
        if keep is not None:  # a whole epoch seen (an interrupted one is never replayed)
            self.kept, self.kept_mb = keep, size / 2**20
            self.log(f"{len(keep)} batches ({size / 2**20:.1f} MiB) kept in memory for the next epochs")


def zero_stage(cfg: Config, world: int, bf16: bool) -> int:
    """The ZeRO stage to run: the configured one, or 0 for a lone fp32 worker (see `shard_single_worker`)."""
    ds = cfg.deepspeed
    lone = world == 1 and not bf16 and not (ds.offload_optimizer or ds.offload_param)
    return 0 if lone and not ds.shard_single_worker else ds.zero_stage


def _engine(deepspeed: Any, model: torch.nn.Module, cfg: Config, bf16: bool, total_steps: int,
            world: int) -> Any:
    from transformers import get_cosine_schedule_with_warmup

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # no decay on norms and biases
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr)

    def scheduler(opt: torch.optim.Optimizer) -> Any:  # built on DeepSpeed's wrapped optimizer
        return get_cosine_schedule_with_warmup(opt, math.ceil(cfg.train.warmup_ratio * total_steps), max(total_steps, 1))

    zero: dict[str, Any] = {"stage": zero_stage(cfg, world, bf16)}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # A client torch AdamW: avoids JIT-building DeepSpeed's CPU Adam (~45 s) on CPU clusters.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


class Evaluator:
    """Generates answers on the eval split (and extra eval sets), rows interleaved across ranks."""

    def __init__(self, cfg: Config, ref: Any, processor: Any, engine: Any, plan: dict, rank: int, world: int):
        self.cfg, self.ref, self.processor, self.engine = cfg, ref, processor, engine
        self.sets: dict[str, str] = plan["eval_sets"]  # name -> prepared data directory
        self.rank, self.world = rank, world

    def run(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, data_dir in self.sets.items():
            for k, v in self.evaluate(data_dir).items():
                out[f"eval/{name}/{k}"] = v
        return out

    @torch.no_grad()
    def evaluate(self, data_dir: str) -> dict[str, float]:
        from .data.evaluation import read_rows
        from .data.transform import DecodeAndEncode
        from .metrics import report_metrics, vqa_metrics

        cfg, family = self.cfg, self.ref.family
        self.engine.eval()
        rows = read_rows(data_dir, cfg.data.eval_split)[: cfg.data.max_eval_rows]
        mine = rows[self.rank :: self.world]
        encode = DecodeAndEncode(lambda: lambda r: family.encode(self.processor, r, train=False,
                                                                 max_length=cfg.data.max_length))
        bs = cfg.train.eval_batch_size
        n_batches = torch.tensor(math.ceil(len(mine) / bs))
        dist.all_reduce(n_batches, op=dist.ReduceOp.MAX)  # ZeRO-3 ranks must run generate in lock-step
        model = self.engine.module
        device = next(model.parameters()).device
        preds: dict[str, str] = {}
        for b in range(int(n_batches)):
            chunk = mine[b * bs : (b + 1) * bs] or mine[-1:]  # a rank with fewer rows repeats its last
            enc = encode({k: [r[k] for r in chunk] for k in chunk[0]})
            batch = {k: torch.from_numpy(v).to(device) for k, v in enc.items() if k != "id"}
            if self.engine.bfloat16_enabled():
                batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
            kwargs = {"synced_gpus": True} if cfg.deepspeed.zero_stage == 3 and self.world > 1 else {}
            texts = family.generate(model, self.processor, batch, cfg.train.max_new_tokens, **kwargs)
            if b * bs < len(mine):
                preds.update(zip(enc["id"].tolist(), texts))
        gathered: list[dict[str, str]] = [{} for _ in range(self.world)]
        dist.all_gather_object(gathered, preds)
        merged = {k: v for part in gathered for k, v in part.items()}
        ordered = [r for r in rows if r["id"] in merged]
        if len(ordered) != len(rows):
            raise RuntimeError(f"evaluation lost rows: {len(rows) - len(ordered)} of {len(rows)} have no prediction")
        preds_list = [merged[r["id"]] for r in ordered]
        refs = [r["answer"] for r in ordered]
        if all(r["task"] == "report" for r in ordered):
            return report_metrics(preds_list, refs)
        return vqa_metrics(preds_list, refs, [r["answer_type"] for r in ordered])


def _maybe_inject_fault(cfg: Config, plan: dict, step: int, rank: int, world: int) -> None:
    """Test hook: the last worker dies once (hard exit) at `run.fail_at_step`."""
    if cfg.run.fail_at_step is None or step != cfg.run.fail_at_step or rank != world - 1:
        return
    from . import storage

    marker = plan["fault_marker"]  # a path or URI under the run storage
    if storage.exists(marker):
        return
    storage.write_text(marker, f"worker {rank} killed at step {step}\n")
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
