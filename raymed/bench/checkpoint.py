"""Suite `checkpoint`: bytes written per checkpoint vs the bytes of the trainable parameters, per method.

For each method a DeepSpeed engine is built exactly as the worker builds it (`raymed.train.engine.build_engine`,
ZeRO stage as configured, one process, gloo), trained for `steps` steps on a fixed batch (so optimizer
state exists) and saved through `raymed.train.checkpoint.save_checkpoint`, the recipe's own code path. The
checkpoint's parts are measured separately: `model/` (what a user ships: trainable tensors and metadata;
each tensor once) and `resume/` (DeepSpeed engine state: trainable weights, fp32 partitions, AdamW moments).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from raymed.tables import table

from raymed.bench.common import (
    BENCH_MODEL, default_max_length, encoded_batches, fit_model_name, header, model_ref, ratio, result, synth_data,
    target, targets_table,
)

DEFAULT_METHODS = ("full", "ln", "attn", "ffn", "lora", "ia3", "prefix")


def dir_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (0 if absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def init_single_process_group(backend: str = "gloo") -> None:
    """A 1-process group for DeepSpeed outside Ray (what Ray Train sets up for each worker)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if backend == "gloo" else "cuda")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def measure(model: str, model_name: str, method: str, batch: dict[str, Any], zero_stage: int, steps: int,
            workdir: Path) -> dict[str, Any]:
    """Train `steps` steps under DeepSpeed, save one checkpoint, and measure its parts."""
    import torch

    from raymed.train.checkpoint import save_checkpoint
    from raymed.config import load_config
    from raymed.models.methods import apply_method
    from raymed.models import load_model
    from raymed.train.engine import build_engine

    cfg = load_config(None, {"model.name": model_name, "method.name": method, "deepspeed.zero_stage": zero_stage,
                             "deepspeed.shard_single_worker": True, "scaling.num_workers": 1, "train.lr": 1e-4})
    ref = model_ref(model)
    net, acc = apply_method(load_model(ref), ref, method)
    trainable_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    engine = build_engine(net, cfg, bf16=False, world=1, total_steps=max(steps, 1))
    engine.train()
    for _ in range(steps):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    out = workdir / f"{method}-z{zero_stage}"
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    save_checkpoint(engine, acc, cfg, out, 0, {"epoch": 0, "history": [], "zero_shot": {}})
    save_s = time.perf_counter() - t0
    parts = {
        "model_bytes": dir_bytes(out / "model"),
        "tensor_bytes": dir_bytes(out / "model" / "trainable.safetensors"),
        "adapter_bytes": dir_bytes(out / "model" / "adapter"),
        "metadata_bytes": dir_bytes(out / "model" / "raymed.json") + dir_bytes(out / "state.json"),
        "resume_bytes": dir_bytes(out / "resume"),
        "total_bytes": dir_bytes(out),
    }
    resume_files = {str(f.relative_to(out / "resume")): f.stat().st_size
                    for f in sorted((out / "resume").rglob("*")) if f.is_file()}
    shutil.rmtree(out)  # a full-model checkpoint of bench-llava is ~1 GB
    del engine, net
    torch.distributed.barrier()
    return {
        "method": method, "zero_stage": zero_stage, "trainable": acc.trainable, "trainable_bytes": trainable_bytes,
        **parts, "save_s": save_s, "resume_files": resume_files,
        "model_ratio": ratio(parts["model_bytes"], trainable_bytes),
        "tensor_ratio": ratio(parts["tensor_bytes"], trainable_bytes),
        "resume_ratio": ratio(parts["resume_bytes"], trainable_bytes),
        "total_ratio": ratio(parts["total_bytes"], trainable_bytes),
    }


def full_size_ln(preset: str, metadata_bytes: int, workdir: Path) -> dict[str, Any]:
    """The `ln` checkpoint file of a full-size preset, written for real: its LN tensors (zeros, exact names
    and shapes, from the `meta`-device model) through the recipe's `save_file`, plus `metadata_bytes` of
    `raymed.json` as measured above. On a 56 M model the LN set is ~100 kB and the per-tensor safetensors
    header is several % of it; at LLaVA-Med size it is not."""
    import torch
    from safetensors.torch import save_file

    from raymed.models.methods import apply_method
    from raymed.models import load_model, resolve

    ref = resolve(preset)
    net, acc = apply_method(load_model(ref, device="meta"), ref, "ln")
    tensors = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in net.named_parameters() if p.requires_grad}
    path = workdir / f"{preset}-ln.safetensors"
    save_file(tensors, path)
    trainable_bytes = 4 * acc.trainable
    model_bytes = path.stat().st_size + metadata_bytes
    return {"method": "ln", "model": preset, "trainable": acc.trainable, "trainable_bytes": trainable_bytes,
            "tensor_bytes": path.stat().st_size, "tensors": len(tensors), "model_bytes": model_bytes,
            "model_ratio": ratio(model_bytes, trainable_bytes),
            "tensor_ratio": ratio(path.stat().st_size, trainable_bytes)}


def run(model: str = BENCH_MODEL, methods: tuple[str, ...] = DEFAULT_METHODS, zero_stage: int = 2,
        steps: int = 1, batch_size: int = 2, max_length: int | None = None,
        full_size: str | None = "llava-med-v1.5") -> dict[str, Any]:
    from raymed.models import load_processor

    started = time.time()
    ref = model_ref(model)
    max_length = max_length or default_max_length(ref, load_processor(ref))
    batch = encoded_batches(model, synth_data(max(8, batch_size)), "train", batch_size, max_length, limit=batch_size)[0]
    model_name = fit_model_name(model)  # what `model.name` of the saved config says
    init_single_process_group()
    rows = []
    with tempfile.TemporaryDirectory(prefix="raymed-bench-ckpt-") as tmp:
        for method in methods:
            rows.append(measure(model, model_name, method, batch, zero_stage, steps, Path(tmp)))
            r = rows[-1]
            print(f"[bench checkpoint] {method}: model/ {r['model_bytes']:,} B, resume/ {r['resume_bytes']:,} B "
                  f"for {r['trainable_bytes']:,} trainable bytes", flush=True)
        full = None
        if full_size and any(r["method"] == "ln" for r in rows):
            ln_meta = next(r for r in rows if r["method"] == "ln")["metadata_bytes"]
            full = full_size_ln(full_size, ln_meta, Path(tmp))
            print(f"[bench checkpoint] {full_size} ln: {full['model_bytes']:,} B for {full['trainable_bytes']:,} "
                  f"trainable bytes ({full['tensors']} tensors)", flush=True)
    worst = max(rows, key=lambda r: r["model_ratio"])
    intrinsic = [r for r in rows if r["method"] in ("full", "ln", "attn", "ffn")]
    targets = [target("checkpoint model/ bytes / trainable bytes (worst method)", worst["model_ratio"], 1.05, "<=",
                      f"worst: {worst['method']}")]
    if intrinsic:
        w = max(intrinsic, key=lambda r: r["model_ratio"])
        targets.append(target("  ... intrinsic methods only", w["model_ratio"], 1.05, "<=", f"worst: {w['method']}"))
    if full:
        targets.append(target(f"  ... ln at {full_size} size (tensors + raymed.json)", full["model_ratio"], 1.05, "<=",
                              f"{full['trainable']:,} LN params"))
    config = {"model": model, "model_dir": model_name, "methods": list(methods), "zero_stage": zero_stage,
              "steps": steps, "batch_size": batch_size, "max_length": max_length, "full_size": full_size}
    doc = result("checkpoint", config, rows, targets, started)
    doc["full_size_ln"] = full
    return doc


COLUMNS = [("method", "method"), ("trainable_bytes", "trainable B"), ("model_bytes", "model/ B"),
           ("model_ratio", "model/ x"), ("tensor_ratio", "tensors x"), ("adapter_bytes", "adapter/ B"),
           ("metadata_bytes", "json B"), ("resume_bytes", "resume/ B"), ("resume_ratio", "resume/ x"),
           ("total_ratio", "total x")]


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return "\n".join([
        header(doc),
        f"model {c['model']}, DeepSpeed ZeRO-{c['zero_stage']} fp32, one checkpoint after {c['steps']} step(s); "
        "x = bytes / trainable bytes",
        table(doc["rows"], COLUMNS), targets_table(doc["targets"]),
    ])


def add_arguments(ap: Any) -> None:
    ap.add_argument("--model", default=BENCH_MODEL)
    ap.add_argument("--methods", default=" ".join(DEFAULT_METHODS), help="space-separated (default: %(default)s)")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--full-size", default="llava-med-v1.5",
                    help="also write the ln checkpoint tensors of this full-size preset ('' to skip)")


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, methods=tuple(args.methods.split()), zero_stage=args.zero_stage, steps=args.steps,
               batch_size=args.batch_size, max_length=args.max_length, full_size=args.full_size or None)
