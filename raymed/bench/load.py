"""Suite `load`: host memory per worker while loading a model directory under ZeRO-3, before vs after.

Two Ray Train workers (gloo) load the same HF directory (the ~58 M `bench-llava`, saved once in bf16 as the
LLaVA-Med release is) and build the DeepSpeed ZeRO-3 engine exactly as the worker recipe does
(`raymed.train.engine.ds_config`, `zero3_loading`, `raymed.models.load_model`, `apply_method`, `build_engine`), in three modes:
- `fp32-whole` (the earlier recipe): every rank loads the whole model in fp32 (`dtype=torch.float32`), then
  DeepSpeed partitions it;
- `bf16-whole`: the training precision of GPU runs, still whole on every rank (`deepspeed.zero3_init=false`);
- `bf16-partitioned` (what GPU runs do now): an `HfDeepSpeedConfig` is alive during `from_pretrained`, so
  transformers loads under `deepspeed.zero.Init` and each rank keeps only its partition.
Per rank: RSS after imports, peak RSS (VmHWM) while loading and building the engine, anonymous (private, not
file-backed) memory after loading and after the engine, and the parameter elements the rank holds. RSS counts the
safetensors pages mapped from the page cache, which ranks share; anonymous memory is what each rank adds.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from raymed.tables import table

from raymed.bench.common import BENCH_MODEL, fit_model_name, header, result, target, targets_table

MODES = {"fp32-whole": ("float32", False), "bf16-whole": ("bfloat16", False), "bf16-partitioned": ("bfloat16", True)}


def anon_mb() -> float:
    """Anonymous (private, not file-backed) memory of this process now."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def held(model: Any) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions (`ds_tensor`), or whole tensors."""
    return sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in model.parameters())


def bf16_dir(model_dir: str) -> str:
    """A bf16 copy of a saved model directory (as the LLaVA-Med release ships its weights), made once."""
    import torch

    from raymed.models import load_model, load_processor, resolve

    out = Path(model_dir + "-bf16")
    if not (out / "config.json").is_file():
        partial = out.with_name(out.name + f".partial-{os.getpid()}")
        ref = resolve(model_dir)
        load_model(ref, dtype=torch.bfloat16).save_pretrained(partial)
        load_processor(ref).save_pretrained(partial)
        partial.rename(out)
    return str(out)


def load_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: load + engine as the recipe does; rank 0 writes every rank's figures to `out`."""
    import ray.train
    import torch
    import torch.distributed as dist

    from raymed.bench.common import peak_rss_mb, release_memory, reset_peak_rss, rss_mb

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from raymed.config import load_config
    from raymed.models.methods import apply_method
    from raymed.models import load_model, resolve
    from raymed.train.engine import build_engine, ds_config, zero3_loading

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(None, {"model.name": config["model_dir"], "method.name": config["method"],
                             "deepspeed.zero_stage": 3, "deepspeed.zero3_init": config["zero3_init"],
                             "scaling.num_workers": world, "train.batch_size": 2})
    dtype = getattr(torch, config["dtype"])
    release_memory()
    base, anon0 = rss_mb(), anon_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    # The worker's path; bf16 is passed directly (the config allows it with use_gpu only; DeepSpeed runs it on CPU).
    ds_cfg = ds_config(cfg, world, dtype == torch.bfloat16)
    keep = zero3_loading(ds_cfg, cfg)
    ref = resolve(cfg.model.name)
    model = load_model(ref, dtype=dtype)
    model, acc = apply_method(model, ref, cfg.method.name, cfg.method.towers, cfg.method.options)
    release_memory()
    loaded_peak, loaded, anon_loaded = peak_rss_mb(), rss_mb(), anon_mb()
    local_elements = held(model)
    engine = build_engine(model, cfg, bf16=dtype == torch.bfloat16, world=world, total_steps=10, ds_cfg=ds_cfg)
    del keep
    release_memory()
    row = {"rank": rank, "rss_start_mb": base, "peak_load_mb": loaded_peak, "rss_loaded_mb": loaded,
           "peak_engine_mb": peak_rss_mb(), "rss_engine_mb": rss_mb(), "anon_start_mb": anon0,
           "anon_loaded_mb": anon_loaded, "anon_engine_mb": anon_mb(), "load_engine_s": time.perf_counter() - t0,
           "local_param_elements": local_elements, "model_elements": acc.total,
           "zero_stage": engine.zero_optimization_stage()}
    rows: list[dict[str, Any]] = [{} for _ in range(world)]
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(rows))


def run(model: str = BENCH_MODEL, workers: int = 2, method: str = "ln", cpus_per_worker: float = 0.5) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymed.cluster import init_ray

    started = time.time()
    model_dir = bf16_dir(fit_model_name(model)) if model == BENCH_MODEL else model
    weights_mb = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20
    started_ray = not ray.is_initialized()
    init_ray(workers * cpus_per_worker + 2)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="raymed-bench-load-") as tmp:
            for mode, (dtype, zero3_init) in MODES.items():
                out = Path(tmp) / f"{mode}.json"
                TorchTrainer(
                    load_loop,
                    train_loop_config={"model_dir": model_dir, "method": method, "zero3_init": zero3_init,
                                       "dtype": dtype, "out": str(out)},
                    torch_config=TorchConfig(backend="gloo"),
                    scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}),
                    run_config=RunConfig(name=f"bench-load-{mode}", storage_path=tmp),
                ).fit()
                for r in json.loads(out.read_text()):
                    rows.append({"mode": mode, **r, "peak_over_start_mb": r["peak_engine_mb"] - r["rss_start_mb"],
                                 "anon_loaded_over_start_mb": r["anon_loaded_mb"] - r["anon_start_mb"]})
                print(f"[bench load] {mode}: peak per rank "
                      f"{[round(r['peak_engine_mb']) for r in rows if r['mode'] == mode]} MB", flush=True)
    finally:
        if started_ray:
            ray.shutdown()

    def worst(mode: str, key: str) -> float:
        return max(r[key] for r in rows if r["mode"] == mode)

    config = {"model": model, "model_dir": model_dir, "weights_mb": weights_mb, "workers": workers,
              "method": method, "zero_stage": 3, "modes": {k: list(v) for k, v in MODES.items()}}
    targets = [
        target("private memory after loading per rank, bf16-partitioned / fp32-whole",
               worst("bf16-partitioned", "anon_loaded_over_start_mb")
               / max(worst("fp32-whole", "anon_loaded_over_start_mb"), 1e-9), 0.5, "<=", "max over ranks"),
        target("peak RSS growth per rank, bf16-partitioned / fp32-whole", worst("bf16-partitioned",
               "peak_over_start_mb") / max(worst("fp32-whole", "peak_over_start_mb"), 1e-9), 1.0, "<=",
               "load + engine, max over ranks (RSS includes shared page-cache pages)"),
        target("parameter elements held per rank, partitioned / model",
               worst("bf16-partitioned", "local_param_elements") / rows[0]["model_elements"], 1.0 / workers + 0.01,
               "<=", "after from_pretrained under zero.Init"),
    ]
    return result("load", config, rows, targets, started)


COLUMNS = [("mode", "mode"), ("rank", "rank"), ("rss_start_mb", "RSS start MB"), ("peak_load_mb", "peak load MB"),
           ("peak_engine_mb", "peak +engine MB"), ("peak_over_start_mb", "peak - start MB"),
           ("anon_loaded_over_start_mb", "private +load MB"), ("anon_engine_mb", "private after MB"),
           ("local_param_elements", "elements held"), ("load_engine_s", "s")]


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return "\n".join([
        header(doc),
        f"model {c['model']} ({c['weights_mb']:.0f} MB of bf16 weights), {c['workers']} workers, ZeRO-3, method "
        f"{c['method']}",
        table(doc["rows"], COLUMNS), targets_table(doc["targets"]),
    ])


def add_arguments(ap: Any) -> None:
    ap.add_argument("--model", default=BENCH_MODEL, help="bench-llava (saved once as a directory) or a directory")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--method", default="ln")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, workers=args.workers, method=args.method, cpus_per_worker=args.cpus_per_worker)
