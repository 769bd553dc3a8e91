"""Elastic runs (`scaling.num_workers: [min, max]`): a resume state that does not depend on the world size.

DeepSpeed's own checkpoint (`resume/state/`) holds each rank's ZeRO partition of the fp32 weights and Adam moments:
it restores only at the world size (and ZeRO stage) that wrote it. An elastic run also writes
`resume/portable.safetensors`, every trainable parameter whole, by name:

    param/<name>        fp32 master weights (what the optimizer updates)
    exp_avg/<name>      Adam first moment
    exp_avg_sq/<name>   Adam second moment
    metadata            adam_step, global_steps, global_samples, skipped_steps, world_size, zero_stage

gathered with DeepSpeed's tensor-fragment API (`deepspeed.utils.safe_get_full_fp32_param` /
`safe_get_full_optimizer_state`: ZeRO 1/2/3 and the bf16 optimizer; the plain torch optimizer state under ZeRO-0)
and written by rank 0. A checkpoint restored at another world size (or another ZeRO stage: a lone fp32 worker runs
stage 0) loads this file through the matching setters, each rank keeping its own new partition. Frozen weights
are in no checkpoint: every rank rebuilds them from the base model.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

PORTABLE = "portable.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")
# Test hook: a folder where rank 0 writes, after every resume, the state the engine holds (raymed.train.elastic.dump_restored)
DUMP_ENV = "RAYMED_RESTORE_DUMP"


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer stepping the fp32 master weights (inside DeepSpeed's ZeRO / bf16 wrappers)."""
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer) else opt


def _fragmented(p: torch.nn.Parameter) -> bool:
    """A parameter whose fp32 master lives in DeepSpeed's flat partitions (ZeRO 1-3, bf16 optimizer)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _trainable(engine: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _adam_step(opt: torch.optim.Optimizer) -> int:
    for state in opt.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _counters(engine: Any, world: int) -> dict[str, Any]:
    """The step counters a restore sets, and where the state was written."""
    return {"adam_step": _adam_step(base_optimizer(engine)), "global_steps": engine.global_steps,
            "global_samples": engine.global_samples, "skipped_steps": engine.skipped_steps,
            "world_size": world, "zero_stage": engine.zero_optimization_stage()}


def gather_state(engine: Any) -> dict[str, torch.Tensor]:
    """Every trainable parameter's fp32 master weights and Adam moments, whole, on every rank (CPU).

    Collective under ZeRO (all ranks must call it, in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = base_optimizer(engine)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None and opt.state:  # ZeRO 1/2, bf16: fragments point into Adam's state once it exists
        link()
    out: dict[str, torch.Tensor] = {}
    for name, p in _trainable(engine):
        if _fragmented(p):
            out[f"param/{name}"] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            for key in MOMENTS:
                out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
        else:  # ZeRO-0 in fp32: the module's parameters are the optimizer's
            out[f"param/{name}"] = p.detach().float().cpu().clone()
            state = opt.state.get(p, {})
            for key in MOMENTS:
                value = state.get(key)
                out[f"{key}/{name}"] = (torch.zeros_like(out[f"param/{name}"]) if value is None
                                        else value.detach().float().cpu().clone())
    return out


def save_portable(engine: Any, folder: Path, rank: int, world: int) -> None:
    """Write `folder/portable.safetensors` (every rank must call it; rank 0 writes)."""
    from safetensors.torch import save_file

    tensors = gather_state(engine)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / PORTABLE, metadata={k: str(v) for k, v in _counters(engine, world).items()})


def needs_portable(saved: dict[str, Any], engine: Any, world: int) -> bool:
    """Whether a checkpoint's state.json says it was written at another world size or ZeRO stage (so DeepSpeed's
    partitioned state cannot be loaded as it is)."""
    return ("world_size" in saved and saved["world_size"] != world) or (
        "zero_stage" in saved and saved["zero_stage"] != engine.zero_optimization_stage())


def _ensure_adam_state(engine: Any, opt: torch.optim.Optimizer, step: int) -> None:
    """Adam's state exists only after its first step: create it (zeros, `step`) for every fp32 master tensor, and
    link DeepSpeed's per-parameter fragments to it, as the first `engine.step()` would."""
    masters = [p for group in opt.param_groups for p in group["params"]]
    # ZeRO-3 puts its flat fp32 partitions into the param groups only while it steps them
    masters += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
    for p in masters:
        state = opt.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO 1/2 and the bf16 optimizer
        link()


def _gathered_for_write(engine: Any, params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """ZeRO-3: whole parameters for the duration; rank 0's values are re-partitioned to every rank at exit."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def load_portable(engine: Any, folder: Path) -> dict[str, str]:
    """Restore trainable weights, Adam moments and step counters from `folder/portable.safetensors` into an engine
    of any world size / ZeRO stage (every rank must call it). Returns the file's metadata."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = folder / PORTABLE
    if not path.is_file():
        raise RuntimeError(f"{folder.parent}: written at another world size and without {PORTABLE} (a checkpoint "
                           "of a fixed-size run restores only at its own scaling.num_workers)")
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    named = _trainable(engine)
    names = {n for n, _ in named}
    saved = {k.split("/", 1)[1] for k in tensors if k.startswith("param/")}
    if names != saved:
        raise RuntimeError(f"{path}: trainable parameters differ from the model's: missing "
                           f"{sorted(names - saved)[:5]}, unknown {sorted(saved - names)[:5]}")
    opt = base_optimizer(engine)
    _ensure_adam_state(engine, opt, int(meta["adam_step"]))
    with torch.no_grad():
        with _gathered_for_write(engine, [p for _, p in named]):  # the module's (low-precision) weights
            for name, p in named:
                p.data.copy_(tensors[f"param/{name}"].to(p.dtype).view_as(p))
        for name, p in named:  # the fp32 master weights and the moments, each rank its own partition
            if hasattr(p, "ds_id"):  # ZeRO-3
                for key in (None, *MOMENTS):
                    _z3_set_full(p, tensors[f"{key or 'param'}/{name}"], key)
            elif _fragmented(p):
                device = p.device
                safe_set_full_fp32_param(p, tensors[f"param/{name}"].to(device))
                for key in MOMENTS:
                    safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].to(device), key)
            else:
                for key in MOMENTS:
                    opt.state[p][key].copy_(tensors[f"{key}/{name}"].view_as(p))
    engine.global_steps = int(meta["global_steps"])
    engine.global_samples = int(meta["global_samples"])
    engine.skipped_steps = int(meta["skipped_steps"])
    return meta


def _z3_set_full(p: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """`safe_set_full_fp32_param` / `safe_set_full_optimizer_state` under ZeRO-3, for a padded last partition too:
    DeepSpeed 0.19.8's `set_full_hp_param` narrows the unpadded value by the padded partition size and fails on the
    last rank when a parameter's size is not a multiple of the world size."""
    opt = p._z3_optimizer
    part, group = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    flat = value.flatten()
    start = part.numel() * opt._get_param_partition_rank(p)
    n = max(0, min(part.numel(), flat.numel() - start))
    part.data[:n].copy_(flat[start:start + n].to(part.device, part.dtype))
    part.data[n:].zero_()  # padding
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)


def sync_lr(engine: Any) -> None:
    """Set the lr scheduler (and the optimizer's learning rates) to `engine.global_steps`, as a loaded scheduler
    state would (call after the schedule's segments are final)."""
    sched = engine.lr_scheduler
    step = engine.global_steps
    sched.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def reseed(seed: int, rank: int, step: int) -> None:
    """Generators of a rank resumed at another world size (its saved RNG belongs to another data split):
    seeded from (seed, rank, step), so a re-run of the same resume draws the same."""
    value = (seed * 1_000_003 + rank * 7_919 + step) % 2**31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def dump_restored(engine: Any, rank: int, world: int, epoch: int, run: str) -> None:
    """Test hook (`RAYMED_RESTORE_DUMP=<folder>`): after a resume, write what the engine holds now — the gathered
    fp32 masters and moments (`param/`, `exp_avg/`, `exp_avg_sq/`) and the module's own weights (`module/`, gathered
    under ZeRO-3) — to `<folder>/<run>/restored-epoch{epoch}-w{world}.safetensors`. Every rank must call it."""
    from safetensors.torch import save_file

    from raymed.train.checkpoint import gathered

    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return
    tensors = gather_state(engine)
    named = _trainable(engine)
    with gathered(engine, [p for _, p in named]):
        tensors.update({f"module/{n}": p.detach().float().cpu().clone() for n, p in named})
    if rank == 0:
        folder = Path(folder) / run
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**_counters(engine, world), "lr": engine.get_lr()[0]}
        save_file(tensors, folder / f"restored-epoch{epoch}-w{world}.safetensors",
                  metadata={k: str(v) for k, v in meta.items()})
