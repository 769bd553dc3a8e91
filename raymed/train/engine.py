"""The DeepSpeed engine of a run, built the same way by the worker and by the benchmarks.

`ds_config` (ZeRO stage, offload, precision, micro-batch) -> `zero3_loading` (weights partitioned while they load,
under ZeRO-3) -> `build_engine` (AdamW over trainable parameters only, the learning-rate `Schedule`). Import after
`DS_ACCELERATOR` is set: `build_engine` imports deepspeed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from raymed.config import Config


class Schedule:
    """The learning-rate multiplier per optimizer step: linear warm-up, then cosine decay to zero.

    Kept as *segments* in the checkpoint, so a resumed run follows the schedule it started with. When a run is
    resumed with a changed `train.epochs`, `train.lr` or `train.warmup_ratio` (`run.allow_config_change`), a new
    segment continues from the learning rate the run had reached (scaled by new/old `train.lr`) and decays to
    zero at the new last step: the learning rate never jumps, and the old part of the curve is not re-stretched.
    """

    def __init__(self, segments: list[dict[str, float]]) -> None:
        self.segments = segments

    @classmethod
    def fresh(cls, total: int, warmup: int, per: int = 0) -> "Schedule":
        """`per`: hold each value for `per` steps (`train.schedule: cosine-per-epoch`, per = steps per epoch). The
        warm-up leaves at least one step to decay over (a run of 1 step has none and ends at 0)."""
        total = max(total, 1)
        return cls([{"start": 0, "end": total, "warmup": min(warmup, total - 1), "scale": 1.0, "per": per}])

    @classmethod
    def for_run(cls, cfg: Config, total: int, steps_per_epoch: int) -> "Schedule":
        per = steps_per_epoch if cfg.train.schedule == "cosine-per-epoch" else 0
        return cls.fresh(total, math.ceil(cfg.train.warmup_ratio * total), per)

    def __call__(self, step: int) -> float:
        """The multiplier of the base learning rate at `step` (the function LambdaLR calls)."""
        seg = next(s for s in reversed(self.segments) if step >= s["start"])
        at, warmup = step - seg["start"], seg["warmup"]
        if at < warmup:  # same formula as transformers' get_cosine_schedule_with_warmup
            return seg["scale"] * at / max(1, warmup)
        at -= warmup
        if seg.get("per"):  # the value at the epoch's first step, for the whole epoch
            at -= at % seg["per"]
        progress = min(1.0, at / max(1, seg["end"] - seg["start"] - warmup))  # never back up past the end
        return seg["scale"] * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def resume(self, state: dict[str, Any], cfg: Config, steps_per_epoch: int, step: int, log: Any) -> None:
        """Take the checkpoint's segments; add a continuation when the (allowed) config change moved the end."""
        old = Config.model_validate(state["config"])
        self.segments[:] = state.get("schedule") or self.segments
        # the steps left at this world size (an elastic run's earlier epochs may have had another step count)
        total = step + steps_per_epoch * (cfg.train.epochs - state["epoch"] - 1)
        ratio = cfg.train.lr / old.train.lr
        if self.segments[-1]["end"] == total and ratio == 1.0 and old.train.warmup_ratio == cfg.train.warmup_ratio:
            return
        scale = self(step) * ratio
        per = steps_per_epoch if cfg.train.schedule == "cosine-per-epoch" else 0
        self.segments.append({"start": step, "end": max(total, step + 1), "warmup": 0, "scale": scale, "per": per})
        log(f"schedule continued at step {step}: lr x{scale:.4g} of the original, cosine to 0 at step {total}")


def zero_stage(cfg: Config, world: int, bf16: bool) -> int:
    """The ZeRO stage to run: the configured one, or 0 for a lone fp32 worker (see `shard_single_worker`)."""
    ds = cfg.deepspeed
    lone = world == 1 and not bf16 and not (ds.offload_optimizer or ds.offload_param)
    return 0 if lone and not ds.shard_single_worker else ds.zero_stage


def ds_config(cfg: Config, world: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of a run (shared by model loading under ZeRO-3 and the engine)."""
    zero: dict[str, Any] = {"stage": zero_stage(cfg, world, bf16)}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return {
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


def zero3_loading(ds_cfg: dict[str, Any], cfg: Config) -> Any:
    """Under ZeRO-3 (and `deepspeed.zero3_init`), an HfDeepSpeedConfig: while it is alive, `from_pretrained`
    partitions the weights as they load. transformers holds it by a weak reference: keep the returned object."""
    if ds_cfg["zero_optimization"]["stage"] != 3 or not cfg.deepspeed.zero3_init:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_cfg)


def build_engine(model: torch.nn.Module, cfg: Config, *, bf16: bool, world: int, schedule: Schedule | None = None,
                 total_steps: int | None = None, ds_cfg: dict[str, Any] | None = None) -> Any:
    """The DeepSpeed engine of a run: AdamW over the trainable parameters only (frozen ones get no grads and no
    state; no weight decay on norms and biases unless `train.decay_norms_and_biases`) under `schedule`, the run's learning-rate schedule (or a fresh one
    over `total_steps` with the config's warm-up). `ds_cfg`: the one `zero3_loading` used, when the weights were
    loaded under it. Needs `deepspeed.init_distributed` (or a process group) first."""
    import deepspeed

    ds_cfg = ds_cfg or ds_config(cfg, world, bf16)
    if schedule is None:
        total = max(total_steps or 1, 1)
        schedule = Schedule.for_run(cfg, total, total // max(cfg.train.epochs, 1))

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # no decay on norms and biases (unless `train.decay_norms_and_biases`), by the parameter's full shape:
            # ZeRO-3 leaves a partitioned parameter an empty 1-d tensor and keeps its shape in `ds_shape`
            vector = len(getattr(p, "ds_shape", p.shape)) < 2
            (no_decay if vector and not cfg.train.decay_norms_and_biases else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step and no host read of Adam's step counters (the unfused update reads each one)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr, fused=True)

    def scheduler(opt: torch.optim.Optimizer) -> Any:  # built on DeepSpeed's wrapped optimizer
        # A plain function, not the Schedule object: LambdaLR saves (and would restore over) an object's state.
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule(step))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    skip_lone_allreduce(engine)
    return engine


def skip_lone_allreduce(engine: Any) -> None:
    """On one data-parallel rank at ZeRO stage 0, turn off DeepSpeed's gradient all-reduce: after every backward it
    flattens all gradients into one buffer, scales it by 1/world, all-reduces it (with itself) and copies it back —
    four passes over the gradients' bytes that change nothing when world = 1 (on `bench-llava` `full`, 223 MB a step;
    docs/benchmarks.md, overhead). Stages 1-3 reduce in their ZeRO optimizer and are left as they are."""
    import torch.distributed as dist

    if engine.zero_optimization_stage() == 0 and dist.is_initialized() and dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False

