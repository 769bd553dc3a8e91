"""Suite `gpu` (CUDA only): the real recipe on a converted model, then LLaVA-Med v1.5 size `ln` vs `full` in bf16.

One command, sized for ~8 minutes on one H200:
(a) `recipe`: the tiny LLaVA-Med v1.5 stand-in (`raymed.models.llava_fixture`, the release's exact layout) is
    converted (`raymed.convert`) and trained by `raymed.train` as a user would: Ray Train, 1 worker, NCCL, bf16,
    zero-shot evaluation, one short epoch, evaluation (every collective on the GPU; SDPA attention).
(b) the LLaVA-Med v1.5 architecture with random bf16 weights, `ln` vs `full`, both ZeRO-3 by default.

Each method of (b) runs in a fresh process on one GPU through the recipe's DeepSpeed engine
(`raymed.engine.build_engine`): `full` with ZeRO-3 (optimizer offloaded to CPU when 16 B/parameter does not
fit the GPU), `ln` with ZeRO-2 (`--ln-zero-stage`). Batches are random token ids with LLaVA's 576 image
tokens plus `--text-tokens` text tokens and random 336 px images. Reported: step time, tokens/s, GPU
training memory (peak allocated minus allocated after the engine is built), and model-FLOPs utilisation:
the method's training FLOPs (linear layers from a profiled forward, as in the `methods` suite, plus
attention score/value products) per second over the GPU's dense bf16 peak.

Without CUDA the suite writes a document that says it was skipped (`--allow-cpu` runs the same code
on the CPU with a small preset, to check the code path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raymed.tables import table

from .common import header, ratio, result, target, targets_table

MARK = "RAYMED_BENCH_GPU "
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H20": 148.0, "A100": 312.0, "A10": 125.0, "L40": 181.0,
                    "L4": 121.0, "B200": 2250.0}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU (longest matching key), else None."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def random_batch(cfg: Any, batch_size: int, text_tokens: int, device: Any, dtype: Any) -> dict[str, Any]:
    """LLaVA inputs: <bos>, image tokens, text; the last quarter of the text is the answer (labels)."""
    import torch

    vc, tc = cfg.vision_config, cfg.text_config
    n_img = (vc.image_size // vc.patch_size) ** 2  # "default" strategy drops CLS
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tc.vocab_size, (batch_size, 1 + n_img + text_tokens), generator=g)
    ids[ids == cfg.image_token_index] = 5 if cfg.image_token_index != 5 else 6  # text never holds the image token
    ids[:, 0] = tc.bos_token_id if tc.bos_token_id is not None else 1
    ids[:, 1:1 + n_img] = cfg.image_token_index
    labels = torch.full_like(ids, -100)
    answer = max(1, text_tokens // 4)
    labels[:, -answer:] = ids[:, -answer:]
    pixels = torch.randn(batch_size, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "pixel_values": pixels.to(device=device, dtype=dtype)}


def attention_flops(cfg: Any, batch: dict[str, Any], input_grad: bool) -> float:
    """Score and value products (not linear layers): forward 4*B*L^2*d per layer; backward 2x when needed."""
    vc, tc = cfg.vision_config, cfg.text_config
    b, seq = batch["input_ids"].shape
    vis_seq = (vc.image_size // vc.patch_size) ** 2 + 1
    layer = cfg.vision_feature_layer
    used = (layer % (vc.num_hidden_layers + 1)) if isinstance(layer, int) else vc.num_hidden_layers
    fwd = 4.0 * b * seq * seq * tc.hidden_size * tc.num_hidden_layers + 4.0 * b * vis_seq**2 * vc.hidden_size * used
    return fwd * (3.0 if input_grad else 1.0)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One method in this process: build, engine, profile, time; GPU memory and FLOPs."""
    import torch

    from raymed.bench.checkpoint import init_single_process_group
    from raymed.bench.common import model_ref
    from raymed.bench.step import profile_pass
    from raymed.config import Config
    from raymed.methods import apply_method

    cuda = torch.cuda.is_available() and not spec.get("cpu")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    init_single_process_group("nccl" if cuda else "gloo")
    from raymed.engine import build_engine  # imports deepspeed: after the process group

    ref = model_ref(spec["model"])
    mcfg = ref.preset.build_config()
    if spec.get("language_layers"):
        mcfg.text_config.num_hidden_layers = int(spec["language_layers"])
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with device:
            from transformers import LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration(mcfg)
    finally:
        torch.set_default_dtype(prev)
    model, acc = apply_method(model, ref, spec["method"])
    build_s = time.perf_counter() - t0
    cfg = Config.model_validate({  # schema only: the preset is accounting-only for `raymed.train`
        "model": {"name": spec["model"]}, "method": {"name": spec["method"]},
        "train": {"batch_size": spec["batch_size"], "lr": 1e-5},
        "deepspeed": {"zero_stage": spec["zero_stage"], "offload_optimizer": spec["offload_optimizer"],
                      "precision": "bf16" if cuda else "fp32", "shard_single_worker": True},
        "scaling": {"num_workers": 1, "use_gpu": cuda},
    })
    batch = random_batch(mcfg, spec["batch_size"], spec["text_tokens"], device, dtype)
    engine = build_engine(model, cfg, bf16=cuda, world=1, total_steps=spec["warmup"] + spec["steps"])
    engine.train()
    prof = profile_pass(engine.module, batch)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    loaded = torch.cuda.memory_allocated() / 2**20 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        sync()
        t = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach().float()))
    step = sorted(times[spec["warmup"]:])[len(times[spec["warmup"]:]) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    tokens = int(batch["attention_mask"].sum())
    input_grad = prof.get("input_grad", 0.0) > 0
    flops = prof.get("step_flops", 0.0) + attention_flops(mcfg, batch, input_grad)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak_tf = spec.get("peak_tflops") or peak_tflops(name)
    return {
        "method": spec["method"], "zero_stage": spec["zero_stage"], "offload_optimizer": spec["offload_optimizer"],
        "trainable": acc.trainable, "total": acc.total, "device": name, "build_s": build_s,
        "step_s": step, "step_s_all": times, "tokens": tokens, "tokens_per_s": tokens / step,
        "loaded_mb": loaded, "peak_mb": peak, "train_mem_mb": peak - loaded, "step_flops": flops,
        "tflops_per_s": flops / step / 1e12, "mfu": flops / step / (peak_tf * 1e12) if peak_tf else None,
        "peak_tflops": peak_tf, "losses": losses, "language_layers": mcfg.text_config.num_hidden_layers,
    }


def recipe(cuda: bool, synth_n: int = 40) -> dict[str, Any]:
    """(a) fixture -> convert -> `raymed.train` (1 worker; NCCL + bf16 on CUDA, gloo + fp32 otherwise)."""
    import ray

    from raymed.config import load_config
    from raymed.convert import main as convert_main
    from raymed.models.llava_fixture import write_llava_med_v15
    from raymed.train import fit

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="raymed-bench-gpu-recipe-") as tmp:
        src = write_llava_med_v15(Path(tmp) / "llava-med-v1.5-mistral-7b")
        if convert_main(["--family", "llava", "--input", str(src), "--out", f"{tmp}/hf"]) != 0:
            return {"error": "conversion failed"}
        overrides = [f"model.name={tmp}/hf", "method.name=ln", "scaling.num_workers=1", f"scaling.use_gpu={cuda}",
                     "scaling.cpus_per_worker=1", f"deepspeed.precision={'bf16' if cuda else 'auto'}",
                     "deepspeed.zero_stage=3", "deepspeed.shard_single_worker=true", "train.epochs=1",
                     f"data.synth_n={synth_n}", "data.max_eval_rows=16", "data.max_length=160", "train.batch_size=8",
                     "train.eval_batch_size=8", "train.max_new_tokens=4", "train.lr=1e-3", "data.preprocess_actors=0",
                     "run.metrics_export=false", f"run.storage={tmp}/runs", "run.name=gpu-recipe"]
        try:
            summary = fit(load_config(None, overrides))
        except Exception as e:  # reported, not raised: part (b) still runs
            return {"error": f"{type(e).__name__}: {e}"[-3000:], "wall_s": time.time() - t0}
        finally:
            ray.shutdown()
    m = summary["metrics"]
    return {"wall_s": time.time() - t0, "steps": summary["steps"], "overrides": overrides,
            **{k: m[k] for k in sorted(m) if k.startswith(("loss", "eval/test/", "zeroshot/test/", "peak", "tokens_per_s"))
               and not k.endswith(("n_closed", "n_open"))}}


def run(model: str = "llava-med-v1.5", batch_size: int = 4, text_tokens: int = 64, steps: int = 5, warmup: int = 2,
        ln_zero_stage: int = 3, full_offload: str = "auto", language_layers: int | None = None,
        peak: float | None = None, allow_cpu: bool = False, with_recipe: bool = True) -> dict[str, Any]:
    import torch

    started = time.time()
    config = {"model": model, "batch_size": batch_size, "text_tokens": text_tokens, "steps": steps, "warmup": warmup,
              "ln_zero_stage": ln_zero_stage, "full_offload": full_offload, "language_layers": language_layers}
    if not torch.cuda.is_available() and not allow_cpu:
        msg = "skipped: no CUDA device (the gpu suite needs one; run it on a GPU machine)"
        print(f"[bench gpu] {msg}", flush=True)
        return result("gpu", config, [], [], started, skipped=msg)
    recipe_out = recipe(torch.cuda.is_available()) if with_recipe else {"skipped": "--no-recipe"}
    print(f"[bench gpu] recipe: {recipe_out.get('error') or recipe_out.get('skipped') or 'ok'} "
          f"({recipe_out.get('wall_s', 0):.0f} s)", flush=True)
    from raymed.bench.common import model_ref

    ref = model_ref(model)
    params = sum(p.numel() for p in _meta_model(ref, language_layers).parameters())
    offload = full_offload == "on"
    if full_offload == "auto" and torch.cuda.is_available():
        offload = 16 * params * 1.1 > torch.cuda.get_device_properties(0).total_memory
    config.update({"params": params, "full_offload_optimizer": offload})
    rows = []
    for method, stage, off in (("full", 3, offload), ("ln", ln_zero_stage, False)):
        spec = {"model": model, "method": method, "zero_stage": stage, "offload_optimizer": off,
                "batch_size": batch_size, "text_tokens": text_tokens, "steps": steps, "warmup": warmup,
                "language_layers": language_layers, "peak_tflops": peak, "cpu": not torch.cuda.is_available()}
        out = _child(spec)
        rows.append(out)
        status = out.get("error") or f"{out['step_s']:.2f} s/step"
        print(f"[bench gpu] {method}: {status}", flush=True)
    targets = []
    if all("error" not in r for r in rows):
        full, ln = rows
        ln["step_ratio"], ln["mem_ratio"] = ratio(ln["step_s"], full["step_s"]), ratio(ln["train_mem_mb"],
                                                                                       full["train_mem_mb"])
        full["step_ratio"] = full["mem_ratio"] = 1.0
        targets = [target("ln/full training memory (GPU)", ln["mem_ratio"], 0.30, "<=",
                          "peak allocated - allocated after engine build"),
                   target("ln/full step time (GPU)", ln["step_ratio"], 0.72, "<=", "")]
    if recipe_out.get("error"):
        targets.append(target("recipe (Ray Train, NCCL, bf16) runs", 0, 1, ">=", recipe_out["error"][:200]))
    return result("gpu", config, rows, targets, started, recipe=recipe_out)


def _meta_model(ref: Any, language_layers: int | None) -> Any:
    import torch
    from transformers import LlavaForConditionalGeneration

    cfg = ref.preset.build_config()
    if language_layers:
        cfg.text_config.num_hidden_layers = language_layers
    with torch.device("meta"):
        return LlavaForConditionalGeneration(cfg)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="raymed-bench-gpu-") as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DS_ACCELERATOR": "cuda" if not spec["cpu"] else "cpu"}
        proc = subprocess.run([sys.executable, "-m", "raymed.bench.gpu", str(path)], capture_output=True, text=True,
                              env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"method": spec["method"], "error": f"exit {proc.returncode}: {proc.stderr.strip()[-3000:]}"}


COLUMNS = [("method", "method"), ("zero_stage", "ZeRO"), ("offload_optimizer", "offload"), ("trainable", "trainable"),
           ("step_s", "step s"), ("step_ratio", "x full"), ("tokens_per_s", "tokens/s"),
           ("train_mem_mb", "train MB"), ("mem_ratio", "x full"), ("tflops_per_s", "TFLOP/s"), ("mfu", "MFU")]


def render(doc: dict[str, Any]) -> str:
    if doc.get("skipped"):
        return f"{header(doc)}\n{doc['skipped']}"
    c = doc["config"]
    rec = doc.get("recipe") or {}
    rec_line = "recipe (a): " + (rec.get("error") or rec.get("skipped") or ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items() if k != "overrides"))
    return "\n".join([
        header(doc), rec_line,
        f"model {c['model']} ({c['params']:,} parameters), batch {c['batch_size']} x "
        f"(576 image + {c['text_tokens']} text tokens), bf16, {c['steps']} timed steps after {c['warmup']}",
        table(doc["rows"], COLUMNS), targets_table(doc["targets"]),
    ])


def add_arguments(ap: Any) -> None:
    ap.add_argument("--model", default="llava-med-v1.5", help="a LLaVA preset (built with random weights)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ln-zero-stage", type=int, default=3)
    ap.add_argument("--no-recipe", dest="with_recipe", action="store_false",
                    help="skip part (a), the recipe on the converted stand-in")
    ap.add_argument("--full-offload", choices=("auto", "on", "off"), default="auto",
                    help="offload full fine-tuning's optimizer to CPU (auto: when 16 B/param exceeds the GPU)")
    ap.add_argument("--language-layers", type=int, default=None, help="shrink the language model (memory)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak, if not known")
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # code-path check with a tiny preset


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, batch_size=args.batch_size, text_tokens=args.text_tokens, steps=args.steps,
               warmup=args.warmup, ln_zero_stage=args.ln_zero_stage, full_offload=args.full_offload,
               language_layers=args.language_layers, peak=args.peak_tflops, allow_cpu=args.allow_cpu,
               with_recipe=args.with_recipe)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(MARK + json.dumps(measure(json.loads(Path(argv[0]).read_text()))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
