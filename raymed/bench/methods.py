"""Suite `methods`: what one training step costs under each method, on identical batches.

A plain PyTorch loop (`raymed.bench.step`). Step time: every (method, towers) variant is built in one
process and the variants take one step each in turn (order rotating), `steps` rounds in each of `repeats`
processes, so a load change on a shared machine hits all of them alike; ratios to `full` are paired by
round. Memory: each variant in its own fresh process, so peaks do not mix. Reported per variant: median
step time and its ratio to `full` (also in CPU time and for forward+backward alone), training memory
(peak RSS minus the loaded model) and its ratio, trainable parameters, and the cost model of docs/DESIGN.md §5 computed from the profiled forward
pass: expected step FLOPs relative to `full`, AdamW state (12 B per trainable parameter on top of the
4 B weight), and the bytes autograd saves for backward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raymed.tables import table

from raymed.bench.common import (
    BENCH_MODEL, default_max_length, encoded_batches, header, median, model_ref, ratio, result, spread, synth_data,
    target, targets_table,
)
from raymed.bench.step import MARK

DEFAULT_VARIANTS = ("full", "ln", "attn", "ffn", "lora", "ia3", "prefix", "ln@language", "ln@vision,projector",
                    "lora@language")


def parse_variant(text: str) -> tuple[str, list[str] | None]:
    """`ln` -> ("ln", None); `lora@language` -> ("lora", ["language"])."""
    method, _, towers = text.partition("@")
    return method, (towers.split(",") if towers else None)


def make_batch(model: str, batch_size: int, max_length: int | None, path: Path, seed: int = 0) -> dict[str, Any]:
    """Encode one fixed training batch from the synthetic Med-VQA and save it for the child processes."""
    import torch

    from raymed.models import load_processor

    ref = model_ref(model)
    max_length = max_length or default_max_length(ref, load_processor(ref))
    data = synth_data(max(8, batch_size), seed=seed)
    batch = encoded_batches(model, data, "train", batch_size, max_length, limit=batch_size)[0]
    torch.save(batch, path)
    return {"batch_size": batch_size, "max_length": max_length, "tokens": int(batch["attention_mask"].sum())}


def run_child(spec: dict[str, Any], workdir: Path, timeout: float | None = None) -> dict[str, Any]:
    """`raymed.bench.step` in a fresh interpreter; its result, or an `error` entry."""
    spec_path = workdir / f"spec-{os.getpid()}-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "raymed.bench.step", str(spec_path)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def run(model: str = BENCH_MODEL, variants: tuple[str, ...] = DEFAULT_VARIANTS, batch_size: int = 4,
        max_length: int | None = None, steps: int = 6, warmup: int = 2, repeats: int = 2, memory_steps: int = 2,
        threads: int = 2, gradient_checkpointing: bool = False, fused_adamw: bool = False) -> dict[str, Any]:
    """Memory: one fresh process per variant. Time: `repeats` processes, each interleaving every variant's steps."""
    started = time.time()
    variants = ("full", *(v for v in variants if v != "full"))  # every ratio is to `full`, variant 0
    config = {"model": model, "variants": list(variants), "batch_size": batch_size, "steps": steps,
              "warmup": warmup, "repeats": repeats, "memory_steps": memory_steps, "threads": threads,
              "gradient_checkpointing": gradient_checkpointing, "fused_adamw": fused_adamw}
    specs = {v: dict(zip(("method", "towers"), parse_variant(v))) for v in variants}
    memory: dict[str, dict[str, Any]] = {}
    timing: list[dict[str, Any]] = []
    loads = []
    with tempfile.TemporaryDirectory(prefix="raymed-bench-") as tmp:
        workdir = Path(tmp)
        config.update(make_batch(model, batch_size, max_length, workdir / "batch.pt"))
        base = {"model": model, "batch": str(workdir / "batch.pt"), "threads": threads,
                "gradient_checkpointing": gradient_checkpointing, "fused_adamw": fused_adamw}
        for v in variants:
            memory[v] = run_child({**base, "mode": "memory", "variants": [specs[v]], "steps": memory_steps,
                                   "warmup": 1}, workdir)
            loads.append(os.getloadavg()[0])
            out = memory[v]
            print(f"[bench methods] memory {v}: " + (out.get("error") or f"{out['train_mem_mb']:.0f} MB, "
                                                   f"{out['trainable']:,} trainable"), flush=True)
        for r in range(repeats):
            out = run_child({**base, "mode": "timing", "variants": [specs[v] for v in variants], "steps": steps,
                             "warmup": warmup, "progress": str(workdir / f"timing-{r + 1}.log")}, workdir)
            loads.append(os.getloadavg()[0])
            if "error" in out:
                raise RuntimeError(f"methods timing process {r + 1} failed: {out['error']}")
            timing.append(out)
            full = [rd[0]["wall"] for rd in out["rounds"]]
            print(f"[bench methods] timing process {r + 1}/{repeats}: full {median(full):.2f} s/step", flush=True)
    rows = summarize(list(variants), memory, timing)
    targets = []
    by = {row["variant"]: row for row in rows}
    if "ln" in by and by["ln"].get("step_ratio") is not None:
        targets += [
            target("ln/full step time", by["ln"]["step_ratio"], 0.72, "<=", "plain loop, paired interleaved steps"),
            target("ln/full training memory", by["ln"]["mem_ratio"], 0.62, "<=", "peak RSS - loaded model"),
        ]
    config["load_1min_during"] = spread(loads)
    return result("methods", config, rows, targets, started, memory=memory, timing=timing)


def summarize(variants: list[str], memory: dict[str, dict[str, Any]],
              timing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: medians over the interleaved rounds, ratios to `full` paired by round."""
    rounds = [rd for proc in timing for rd in proc["rounds"]]  # rd[i]: variant i's step in that round
    full_mem = memory.get("full", {})
    rows = []
    for i, v in enumerate(variants):
        mem = memory.get(v, {})
        if "error" in mem or not mem:
            rows.append({"variant": v, "error": mem.get("error", "not run")})
            continue
        wall = [rd[i]["wall"] for rd in rounds]
        step_s = median(wall)
        row = {
            "variant": v, "method": mem["method"], "towers": mem["towers"], "trainable": mem["trainable"],
            "total": mem["total"], "trainable_pct": 100.0 * mem["trainable"] / mem["total"],
            "step_s": step_s, "step_ratio": median([rd[i]["wall"] / rd[0]["wall"] for rd in rounds]),
            "step_ratio_rounds": [rd[i]["wall"] / rd[0]["wall"] for rd in rounds],
            "cpu_s": median([rd[i]["cpu"] for rd in rounds]),
            "cpu_ratio": median([rd[i]["cpu"] / rd[0]["cpu"] for rd in rounds]),
            "forward_s": median([rd[i]["phases"][0] for rd in rounds]),
            "backward_s": median([rd[i]["phases"][1] for rd in rounds]),
            "optimizer_s": median([rd[i]["phases"][2] for rd in rounds]),
            "fwd_bwd_ratio": median([sum(rd[i]["phases"][:2]) / sum(rd[0]["phases"][:2]) for rd in rounds]),
            "flops_ratio": ratio(mem["step_flops"], full_mem["step_flops"]) if "step_flops" in full_mem else None,
            "tokens_per_s": mem["tokens"] / step_s,
            "train_mem_mb": mem["train_mem_mb"], "mem_ratio": ratio(mem["train_mem_mb"], full_mem.get("train_mem_mb", 0)),
            "loaded_mb": mem["loaded_mb"], "saved_activation_mb": mem["saved_activation_mb"],
            "adamw_state_mb": 12 * mem["trainable"] / 2**20,  # fp32 grads 4 B + two moments 8 B per trainable
            "loss_first_last": [mem["losses"][0], mem["losses"][-1]], "peak_reset": mem["peak_reset"],
        }
        rows.append(row)
    return rows


COLUMNS = [
    ("variant", "method@towers"), ("trainable", "trainable"), ("trainable_pct", "%"), ("step_s", "step s"),
    ("step_ratio", "x full"), ("cpu_ratio", "cpu x full"), ("fwd_bwd_ratio", "fwd+bwd x"), ("flops_ratio", "theory"),
    ("forward_s", "fwd s"), ("backward_s", "bwd s"), ("optimizer_s", "adamw s"), ("train_mem_mb", "train MB"), ("mem_ratio", "x full"),
    ("saved_activation_mb", "saved act MB"), ("adamw_state_mb", "grad+adam MB"),
]


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    lines = [header(doc),
             f"model {c['model']}, batch {c['batch_size']} x {c['max_length']} tokens, {c['threads']} threads; time: "
             f"{c['repeats']} process(es) x {c['steps']} rounds (after {c['warmup']}) of one step per variant, "
             f"interleaved; memory: one process per variant; "
             f"1-min load during the run {c['load_1min_during']}",
             table(doc["rows"], COLUMNS),
             "theory = expected step FLOPs / full (linear+conv layers: forward + input grads where autograd needs "
             "them + weight grads of trainable weights)",
             targets_table(doc["targets"])]
    return "\n".join(x for x in lines if x)


def add_arguments(ap: Any) -> None:
    ap.add_argument("--model", default=BENCH_MODEL, help=f"preset, model directory or {BENCH_MODEL} (default)")
    ap.add_argument("--variants", default=" ".join(DEFAULT_VARIANTS),
                    help="space-separated METHOD or METHOD@TOWER,TOWER (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=None, help="default: image tokens + 40")
    ap.add_argument("--steps", type=int, default=6, help="timed rounds per timing process (one step per variant)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--repeats", type=int, default=2, help="timing processes")
    ap.add_argument("--memory-steps", type=int, default=2, help="steps of each memory process (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--fused-adamw", action="store_true", help="torch AdamW(fused=True) instead of the default")


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, variants=tuple(args.variants.split()), batch_size=args.batch_size,
               max_length=args.max_length, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
               memory_steps=args.memory_steps,
               threads=args.threads, gradient_checkpointing=args.gradient_checkpointing, fused_adamw=args.fused_adamw)
