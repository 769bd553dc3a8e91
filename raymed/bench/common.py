"""What every benchmark suite shares: the bench model, fixed batches, memory probes, statistics, output.

The default model, `bench-llava`, is a LLaVA-architecture model of ~58 M parameters (CLIP 448-d x 8
layers at 224 px, patch 16 + Mistral 640-d x 8 layers) with random weights: big enough that a CPU step
is compute-bound, small enough to train on 2 cores. It is no registered preset (it exists for the
benchmarks only); `model_ref("bench-llava")` builds it, and `fit_model_name` saves it as a local HF
directory once, so the Ray Train recipe (which resolves presets or directories) can train it too.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raymed.data.plan import CACHE as DATA_CACHE

from raymed.machine import describe
from raymed.tables import table

CACHE = DATA_CACHE / "bench"
BENCH_MODEL = "bench-llava"


# ---- the bench model ----------------------------------------------------------------------------
def bench_llava_config() -> Any:
    """LLaVA-1.5 layout (feature layer -2, GELU projector) at benchmark size: ~58 M parameters."""
    from raymed.models.llava import llava_config

    return llava_config(
        dict(hidden_size=448, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=7, image_size=224,
             patch_size=16, projection_dim=448),
        dict(hidden_size=640, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=10,
             num_key_value_heads=5, max_position_embeddings=1024),
    )


def model_ref(name: str) -> Any:
    """A `raymed.models.ModelRef` for a preset, a model directory, or the unregistered `bench-llava`."""
    from raymed.models import FAMILIES, ModelRef, Preset, resolve

    if name == BENCH_MODEL:
        preset = Preset(BENCH_MODEL, "llava", "benchmark LLaVA (CLIP 448x8 @224 + Mistral 640x8), random weights",
                        bench_llava_config)
        return ModelRef(FAMILIES["llava"], preset=preset)
    return resolve(name)


def fit_model_name(name: str, seed: int = 0) -> str:
    """A `model.name` the training recipe accepts: presets as they are, `bench-llava` saved as a directory."""
    if name != BENCH_MODEL:
        return name
    from raymed.models import load_model, load_processor

    ref = model_ref(name)
    digest = hashlib.sha256(ref.preset.build_config().to_json_string().encode()).hexdigest()[:10]
    out = CACHE / "models" / f"{name}-s{seed}-{digest}"
    if not (out / "config.json").is_file():
        partial = out.with_name(out.name + f".partial-{os.getpid()}")
        load_model(ref, seed=seed).save_pretrained(partial)
        load_processor(ref).save_pretrained(partial)
        partial.rename(out)
    return str(out)


def default_max_length(ref: Any, processor: Any) -> int:
    """Token length that fits the prompt (incl. LLaVA's image tokens) and a short answer, rounded to 8."""
    n = ref.family.num_image_tokens(processor) + 40 if ref.family.name == "llava" else 40
    return (n + 7) // 8 * 8


def synth_data(n_images: int, image_size: int = 64, seed: int = 0, rows_per_shard: int = 1000) -> Path:
    """Prepared shards of the synthetic Med-VQA (3 questions per image), cached by their parameters."""
    from raymed.data.prepare import MANIFEST, VAL_FRACTION, prepare
    from raymed.data.synth import generate

    if image_size == 64 and rows_per_shard == 1000:
        from raymed.data.plan import synthetic_dataset  # the very directory `fit` trains on

        return synthetic_dataset("base", n_images, seed)
    root = CACHE / "data" / f"base-n{n_images}-px{image_size}-s{seed}-r{rows_per_shard}"
    prepared = root / f"prepared-val{VAL_FRACTION:g}"  # train less the val split `prepare` carves, as `fit` has it
    if not (prepared / MANIFEST).is_file():
        generate(root / "raw", n=n_images, seed=seed, style="base", size=image_size)
        prepare("vqa-rad", root / "raw", prepared, overwrite=True, rows_per_shard=rows_per_shard,
                row_group_rows=min(256, rows_per_shard))
    return prepared


def encoded_batches(ref_name: str, data_dir: Path, split: str, batch_size: int, max_length: int,
                    limit: int | None = None, pad_to_multiple_of: int = 8, cut: bool = True) -> list[dict[str, Any]]:
    """Training batches (torch tensors) of `split`, decoded and encoded exactly as the stream does, each cut to its
    longest sample as the worker cuts it (`Family.cut_padding`; `cut=False`: at `max_length`, as streamed)."""
    import torch

    from raymed.data.rows import read_split_rows
    from raymed.data.transform import DecodeAndEncode

    ref = model_ref(ref_name)
    from raymed.models import load_processor

    processor = load_processor(ref)
    transform = DecodeAndEncode(lambda: lambda rows: ref.family.encode(processor, rows, train=True,
                                                                       max_length=max_length))
    rows = read_split_rows(data_dir, split)[:limit]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        enc = transform({k: [r[k] for r in chunk] for k in chunk[0]})
        if cut:
            enc = ref.family.cut_padding(processor, enc, train=True, multiple=pad_to_multiple_of)
        out.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in enc.items() if k != "id"})
    return out


# ---- memory -------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), or since the start of the process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS, so RSS reflects live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ---- statistics ---------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> list[float]:
    """[min, max] of the values (how far the repeats disagree)."""
    return [float(min(values)), float(max(values))] if values else []


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def target(name: str, value: float, limit: float, op: str, note: str = "") -> dict[str, Any]:
    """One checked target `value op limit`: a figure the suite must reach (e.g. near the cost model, little overhead)."""
    met = value <= limit if op == "<=" else value >= limit
    return {"name": name, "value": value, "target": f"{op} {limit}", "met": bool(met), "note": note}


# ---- output -----------------------------------------------------------------------------------------
def result(suite: str, config: Mapping[str, Any], rows: list[dict[str, Any]], targets: list[dict[str, Any]],
           started: float, **extra: Any) -> dict[str, Any]:
    """The JSON document of one suite run."""
    return {
        "suite": suite, "command": " ".join([Path(sys.executable).name, "-m", "raymed.bench", *sys.argv[1:]]),
        "config": dict(config), "machine": describe(load=True, with_commit=True), "wall_s": round(time.time() - started, 1),
        "rows": rows, "targets": targets, **extra,
    }


def write_json(doc: Mapping[str, Any], out: Path | str | None) -> None:
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print(f"[bench] wrote {out}", flush=True)


def targets_table(targets: Sequence[Mapping[str, Any]]) -> str:
    if not targets:
        return ""
    return "targets (figures each suite must reach):\n" + table(
        [{**t, "met": "yes" if t["met"] else "NO"} for t in targets],
        [("name", "target"), ("value", "measured"), ("target", "limit"), ("met", "met"), ("note", "note")],
    )


def header(doc: Mapping[str, Any]) -> str:
    m = doc["machine"]
    return (f"suite {doc['suite']}: {m['cpu']}, {m['cores']} cores, load {m['load_average']}, "
            f"torch {m['versions']['torch']}, ray {m['versions']['ray']}; {doc['wall_s']:.0f} s")
