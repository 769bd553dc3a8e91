"""Checkpoints: only the trainable parameters (safetensors) + resume state kept apart.

Layout of one checkpoint directory (Ray merges the ranks' files into it)::

    model/trainable.safetensors   trainable parameters only, full shapes (gathered under ZeRO-3)
    model/raymed.json             model, method, towers, options, accounting, config
    resume/                       DeepSpeed engine state (optimizer, scheduler, step), frozen weights excluded
    resume/rng-rank{N}.safetensors
    state.json                    epoch, metrics history, zero-shot metrics

Every trainable tensor is stored once (a peft adapter directory would store the same tensors again: 2x
for LoRA / IA3); `python -m raymed.export --adapter` writes one from a checkpoint when peft needs it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .accounting import Accounting
from .config import Config

TAG = "state"


def _gathered(engine: Any, params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full parameter tensors on every rank for the duration (ZeRO-3 partitions them)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_checkpoint(
    engine: Any, acc: Accounting, cfg: Config, out: Path, rank: int, state: dict[str, Any], full: bool = False
) -> None:
    """Write this rank's part of a checkpoint into `out` (every rank must call it).

    `full=True` also writes every parameter to `model/full.safetensors` (for audits: frozen ones unchanged).
    """
    model = engine.module
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or full]
    with _gathered(engine, [p for _, p in named]):
        if rank == 0:
            (out / "model").mkdir(parents=True)
            tensors = {n: p.detach().to("cpu").contiguous().clone() for n, p in named}
            empty = [n for n, t in tensors.items() if t.numel() == 0]
            if empty:  # the known ZeRO-3 failure mode: partitioned placeholders of shape [0]
                raise RuntimeError(f"refusing to save empty tensors (ZeRO-3 gather failed): {empty[:5]}")
            trainable = {n: tensors[n] for n, p in named if p.requires_grad}
            save_file(trainable, out / "model" / "trainable.safetensors")
            if full:
                save_file(tensors, out / "model" / "full.safetensors")
            meta = {"model": cfg.model.name, "method": cfg.method.name, "towers": cfg.method.towers,
                    "options": cfg.method.options, "accounting": acc.to_dict(), "config": cfg.model_dump(mode="json")}
            meta["accounting"].pop("unused_names", None)
            (out / "model" / "raymed.json").write_text(json.dumps(meta, indent=2))
            (out / "state.json").write_text(json.dumps({**state, "step": engine.global_steps}, indent=2))
    engine.save_checkpoint(str(out / "resume"), tag=TAG, exclude_frozen_parameters=True, save_latest=True)
    save_file({"torch": torch.get_rng_state()}, out / "resume" / f"rng-rank{rank}.safetensors")


def load_resume_state(engine: Any, ckpt: Path, rank: int) -> dict[str, Any]:
    """Restore engine (trainable weights, optimizer, scheduler, step) and RNG; return state.json."""
    path, _ = engine.load_checkpoint(str(ckpt / "resume"), tag=TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{ckpt}: DeepSpeed could not load the resume state")
    rng = ckpt / "resume" / f"rng-rank{rank}.safetensors"
    if rng.exists():
        torch.set_rng_state(load_file(rng)["torch"])
    return json.loads((ckpt / "state.json").read_text())


def peft_host(model: torch.nn.Module) -> Any:
    """The peft model to save an adapter from: the model itself, or MISS's wrapped text encoder."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model
    inner = getattr(model, "text_encoder", None)
    return inner if isinstance(inner, PeftModel) else None


def load_trainable(ckpt_model_dir: Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the fine-tuned model from `model/` of a checkpoint: base + method + trainable tensors."""
    from .methods import apply_method
    from .models import load_model, load_processor, resolve

    meta = json.loads((ckpt_model_dir / "raymed.json").read_text())
    seed = meta["config"]["train"]["seed"]
    ref = resolve(meta["model"])
    model, _ = apply_method(load_model(ref, seed=seed), ref, meta["method"], meta["towers"], meta["options"],
                            seed=seed)
    tensors = load_file(ckpt_model_dir / "trainable.safetensors")
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if unknown or missing:
        raise RuntimeError(f"{ckpt_model_dir}: checkpoint does not match the method: unknown {unknown[:5]}, "
                           f"missing {missing[:5]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].dtype))
    return model, load_processor(ref), meta
