"""Suite `methods`: what one training step costs under each method, on identical batches.

Every (method, towers) variant runs `warmup + steps` steps of a plain PyTorch loop in a fresh process
(`raymed.bench.step`), `repeats` rounds interleaved (full, ln, attn, ... then again), so slow phases of a
shared machine hit all methods alike. Reported per variant: median step time, its ratio to `full`
(median of the per-round paired ratios), training memory (peak RSS minus the loaded model) and its
ratio, trainable parameters, and the cost model of DESIGN.md §5 computed from the profiled forward
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

from .common import (
    BENCH_MODEL, default_max_length, encoded_batches, header, median, model_ref, ratio, result, spread, synth_data,
    table, target, targets_table,
)
from .step import MARK

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
    """One variant in a fresh interpreter; its result line, or an `error` entry."""
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
        max_length: int | None = None, steps: int = 5, warmup: int = 2, repeats: int = 3, threads: int = 2,
        gradient_checkpointing: bool = False, fused_adamw: bool = False) -> dict[str, Any]:
    started = time.time()
    if "full" not in variants:
        variants = ("full", *variants)  # every ratio is to `full`
    config = {"model": model, "variants": list(variants), "batch_size": batch_size, "steps": steps,
              "warmup": warmup, "repeats": repeats, "threads": threads,
              "gradient_checkpointing": gradient_checkpointing, "fused_adamw": fused_adamw}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    loads = []
    with tempfile.TemporaryDirectory(prefix="raymed-bench-") as tmp:
        workdir = Path(tmp)
        config.update(make_batch(model, batch_size, max_length, workdir / "batch.pt"))
        for r in range(repeats):
            order = list(variants[r % len(variants):]) + list(variants[: r % len(variants)])  # rotate each round
            for v in order:
                method, towers = parse_variant(v)
                spec = {"model": model, "method": method, "towers": towers, "batch": str(workdir / "batch.pt"),
                        "steps": steps, "warmup": warmup, "threads": threads,
                        "gradient_checkpointing": gradient_checkpointing, "fused_adamw": fused_adamw}
                out = run_child(spec, workdir)
                out["round"] = r
                loads.append(os.getloadavg()[0])
                runs[v].append(out)
                msg = out.get("error") or (f"median step {median(out['step_s']):.3f} s, "
                                           f"train mem {out['train_mem_mb']:.0f} MB")
                print(f"[bench methods] round {r + 1}/{repeats} {v}: {msg}", flush=True)
    rows = summarize(runs)
    targets = []
    by = {row["variant"]: row for row in rows}
    if "ln" in by and by["ln"].get("step_ratio") is not None:
        targets += [
            target("ln/full step time", by["ln"]["step_ratio"], 0.72, "<=", "plain loop, median of paired rounds"),
            target("ln/full training memory", by["ln"]["mem_ratio"], 0.62, "<=", "peak RSS - loaded model"),
        ]
    config["load_1min_during"] = spread(loads)
    return result("methods", config, rows, targets, started, runs=runs)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per variant: medians over rounds, and ratios to `full` paired by round."""
    full = {o["round"]: o for o in runs.get("full", []) if "error" not in o}
    rows = []
    for v, outs in runs.items():
        ok = [o for o in outs if "error" not in o]
        if not ok:
            rows.append({"variant": v, "error": outs[0].get("error") if outs else "not run"})
            continue
        step_ratios = [ratio(median(o["step_s"]), median(full[o["round"]]["step_s"])) for o in ok if o["round"] in full]
        mem_ratios = [ratio(o["train_mem_mb"], full[o["round"]]["train_mem_mb"]) for o in ok if o["round"] in full]
        first = ok[0]
        full0 = next(iter(full.values()), None)
        step_s = median([median(o["step_s"]) for o in ok])
        cpu_ratios = [ratio(median(o["cpu_s"]), median(full[o["round"]]["cpu_s"])) for o in ok if o["round"] in full]
        phases = [median([p[i] for o in ok for p in o["phases_s"]]) for i in range(3)]
        rows.append({
            "variant": v, "method": first["method"], "towers": first["towers"],
            "trainable": first["trainable"], "total": first["total"],
            "trainable_pct": 100.0 * first["trainable"] / first["total"],
            "step_s": step_s, "step_s_all": [s for o in ok for s in o["step_s"]],
            "step_ratio": median(step_ratios) if step_ratios else None, "step_ratio_rounds": step_ratios,
            "cpu_s": median([median(o["cpu_s"]) for o in ok]),
            "cpu_ratio": median(cpu_ratios) if cpu_ratios else None, "cpu_ratio_rounds": cpu_ratios,
            "forward_s": phases[0], "backward_s": phases[1], "optimizer_s": phases[2],
            "flops_ratio": ratio(first["step_flops"], full0["step_flops"]) if full0 else None,
            "tokens_per_s": first["tokens"] / step_s,
            "train_mem_mb": median([o["train_mem_mb"] for o in ok]),
            "mem_ratio": median(mem_ratios) if mem_ratios else None, "mem_ratio_rounds": mem_ratios,
            "loaded_mb": median([o["loaded_mb"] for o in ok]),
            "saved_activation_mb": first["saved_activation_mb"],
            "adamw_state_mb": 12 * first["trainable"] / 2**20,  # fp32 grads 4 B + two moments 8 B per trainable
            "loss_first_last": [first["losses"][0], first["losses"][-1]],
            "peak_reset": all(o["peak_reset"] for o in ok),
        })
    return rows


COLUMNS = [
    ("variant", "method@towers"), ("trainable", "trainable"), ("trainable_pct", "%"), ("step_s", "step s"),
    ("step_ratio", "x full"), ("cpu_ratio", "cpu x full"), ("flops_ratio", "theory"), ("forward_s", "fwd s"),
    ("backward_s", "bwd s"), ("optimizer_s", "adamw s"), ("train_mem_mb", "train MB"), ("mem_ratio", "x full"),
    ("saved_activation_mb", "saved act MB"), ("adamw_state_mb", "grad+adam MB"),
]


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    lines = [header(doc),
             f"model {c['model']}, batch {c['batch_size']} x {c['max_length']} tokens, {c['threads']} threads, "
             f"{c['steps']} timed steps after {c['warmup']} warm-up, {c['repeats']} interleaved rounds; "
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
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (fresh process each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--fused-adamw", action="store_true", help="torch AdamW(fused=True) instead of the default")


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, variants=tuple(args.variants.split()), batch_size=args.batch_size,
               max_length=args.max_length, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
               threads=args.threads, gradient_checkpointing=args.gradient_checkpointing, fused_adamw=args.fused_adamw)
