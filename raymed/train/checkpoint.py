"""Checkpoints: only the trainable parameters (safetensors) + resume state kept apart.

Layout of one checkpoint directory (Ray merges the ranks' files into it)::

    model/trainable.safetensors   trainable parameters only, full shapes (gathered under ZeRO-3)
    model/raymed.json             model, method, towers, options, accounting, config
    resume/                       DeepSpeed engine state (optimizer, scheduler, step), frozen weights excluded
    resume/rng-rank{N}.safetensors  torch (CPU, CUDA) generator states of rank N
    resume/rng-rank{N}.json       Python `random` and NumPy generator states of rank N
    resume/portable.safetensors   elastic runs: fp32 weights + Adam moments by name, any world size (raymed.train.elastic)
    state.json                    epoch, metrics history, zero-shot metrics, wall time, lr schedule segments
    row.json                      the run's result row (raymed.tune.results), written by the worker
    eval/<set>/predictions.jsonl  the epoch's answers per eval set (+ metrics.json); zeroshot/<set>/ likewise

Every trainable tensor is stored once (a peft adapter directory would store the same tensors again: 2x
for LoRA / IA3); `python -m raymed.train.export --adapter` writes one from a checkpoint when peft needs it.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raymed.models.accounting import Accounting
from raymed.config import Config, ConfigError, config_changes

TAG = "state"


def gathered(engine: Any, params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full parameter tensors on every rank for the duration (ZeRO-3 partitions them)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_checkpoint(
    engine: Any, acc: Accounting, cfg: Config, out: Path, rank: int, state: dict[str, Any], full: bool = False,
    portable: bool = False,
) -> None:
    """Write this rank's part of a checkpoint into `out` (every rank must call it).

    `full=True` also writes every parameter to `model/full.safetensors` (for audits: frozen ones unchanged).
    `portable=True` also writes `resume/portable.safetensors`, restorable at any world size (raymed.train.elastic).
    """
    model = engine.module
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or full]
    with gathered(engine, [p for _, p in named]):
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
                    "options": cfg.method.options, "accounting": acc.to_dict(), "config": cfg.as_written()}
            meta["accounting"].pop("unused_names", None)
            (out / "model" / "raymed.json").write_text(json.dumps(meta, indent=2))
            (out / "state.json").write_text(json.dumps({**state, "step": engine.global_steps,
                                                        "world_size": _world(),
                                                        "zero_stage": engine.zero_optimization_stage()}, indent=2))
    engine.save_checkpoint(str(out / "resume"), tag=TAG, exclude_frozen_parameters=True, save_latest=True)
    save_rng(out / "resume", rank)
    if portable:
        from raymed.train.elastic import save_portable

        save_portable(engine, out / "resume", rank, _world())


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def save_rng(folder: Path, rank: int) -> None:
    """Every generator a training step can draw from (dropout, sampling): torch CPU and CUDA, NumPy, Python."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, folder / f"rng-rank{rank}.safetensors")
    np_state = np.random.get_state()
    (folder / f"rng-rank{rank}.json").write_text(json.dumps({
        "python": _lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }))


def load_rng(folder: Path, rank: int) -> None:
    """Restore what :func:`save_rng` saved (a missing file leaves that generator as it is)."""
    tensors = folder / f"rng-rank{rank}.safetensors"
    if tensors.exists():
        states = load_file(tensors)
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
    other = folder / f"rng-rank{rank}.json"
    if other.exists():
        data = json.loads(other.read_text())
        random.setstate(_tuples(data["python"]))
        kind, keys, *rest = data["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_resume_state(engine: Any, ckpt: Path, rank: int, cfg: Config | None = None) -> dict[str, Any]:
    """Restore engine (trainable weights, optimizer, scheduler, step) and every RNG; return state.json with the
    checkpoint's config under `config`.

    With `cfg`, a resume under another config is refused (naming every changed key) unless
    `run.allow_config_change` is set. A checkpoint written at another world size or ZeRO stage restores from its
    world-size-free state (raymed.train.elastic; RNG states are not restored then) and the returned state says so under
    `resharded_from`.
    """
    meta = json.loads((ckpt / "model" / "raymed.json").read_text())
    if cfg is not None:
        changes = config_changes(meta["config"], cfg.as_written())
        if changes and not cfg.run.allow_config_change:
            raise ConfigError([*changes, "resuming a run under another config: use a new run.name, or set "
                               "run.allow_config_change=true to continue this run with the new values"],
                              f"resume from {ckpt}")
    saved = json.loads((ckpt / "state.json").read_text())
    from raymed.train.elastic import load_portable, needs_portable

    if needs_portable(saved, engine, _world()):
        load_portable(engine, ckpt / "resume")
        saved["resharded_from"] = {"world_size": saved["world_size"], "zero_stage": saved.get("zero_stage")}
        return {**saved, "config": meta["config"]}
    path, _ = engine.load_checkpoint(str(ckpt / "resume"), tag=TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{ckpt}: DeepSpeed could not load the resume state")
    load_rng(ckpt / "resume", rank)
    return {**saved, "config": meta["config"]}


def peft_host(model: torch.nn.Module) -> Any:
    """The peft model to save an adapter from: the model itself, or MISS's wrapped text encoder."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model
    inner = getattr(model, "text_encoder", None)
    return inner if isinstance(inner, PeftModel) else None


def load_trainable(ckpt_model_dir: Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the fine-tuned model from `model/` of a checkpoint: base + method + trainable tensors, in the run's
    training precision (a bf16 run's answers come from bf16 weights, as its in-run evaluation's did)."""
    from raymed.models.methods import apply_method
    from raymed.models import load_model, load_processor, resolve

    meta = json.loads((ckpt_model_dir / "raymed.json").read_text())
    cfg = Config.model_validate(meta["config"])
    seed = cfg.train.seed
    ref = resolve(meta["model"])
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model, _ = apply_method(load_model(ref, seed=seed, dtype=dtype), ref, meta["method"], meta["towers"],
                            meta["options"], seed=seed)
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


def find_checkpoint(run: str | Path) -> str:
    """The checkpoint to use for `run` (a folder or URI): itself when it is a checkpoint, else the run folder's
    latest `epoch-NNNN`.

    Raises FileNotFoundError, saying what was expected, for a folder that is neither.
    """
    from raymed import storage
    from raymed.tune.results import latest_checkpoint

    run = storage.resolve(run)
    if not storage.is_dir(run):
        raise FileNotFoundError(f"{run}: no such run or checkpoint folder")
    if storage.is_file(storage.join(run, "model", "raymed.json")):
        return run
    ckpt = latest_checkpoint(run, holding="model/raymed.json")
    if ckpt is not None:
        return ckpt
    raise FileNotFoundError(f"{run}: no raymed checkpoint in this folder (expected epoch-NNNN/model/raymed.json; "
                            "a run writes one after its first epoch)")


def load_for_inference(spec: str) -> tuple[torch.nn.Module, Any, Any, dict[str, Any] | None]:
    """(model in eval mode, model ref, processor, the training config or None) for `spec`: a run folder or
    checkpoint (base + method + trained tensors), an HF model directory (e.g. `raymed.train.export` output) or a preset."""
    from raymed.models import load_model, load_processor, resolve

    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        model, processor, meta = load_trainable(Path(find_checkpoint(path)) / "model")
        return model.eval(), resolve(meta["model"]), processor, meta["config"]
    ref = resolve(spec)
    return load_model(ref).eval(), ref, load_processor(ref), None
