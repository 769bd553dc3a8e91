"""Suite `gpu` (CUDA only): the real recipe on a converted model, then LLaVA-Med v1.5 size methods compared in bf16.

One command, sized for ~8 minutes on one H200:
(a) `recipe`: the tiny LLaVA-Med v1.5 stand-in (`tests/fixtures/llava_release.py`, the release's exact layout) is
    converted (`raymed.models.convert`) and trained by `raymed.train` as a user would: Ray Train, 1 worker, NCCL, bf16,
    zero-shot evaluation, one short epoch, evaluation (every collective on the GPU; SDPA attention).
(b) the LLaVA-Med v1.5 architecture with random bf16 weights: `ln` / `attn` / `ffn` / `lora` / `full` at the
    deepest language model where `full` fits with plain GPU Adam (no offload), and `ln` at the full depth.

Sizing comes first, from the device's free memory and a meta-device build (`size_parts`, a pure function):
bytes per parameter (18 trainable with Adam, 2 frozen) plus activations (34 B per token per hidden unit per layer,
vision tower included), within 85% of the free memory; the batch halves until `ln` fits at full depth. Each part
runs in a fresh process through the recipe's DeepSpeed engine (`raymed.train.engine.build_engine`), `full` with ZeRO-3,
the others with `--ln-zero-stage`. Batches are random token ids with LLaVA's 576 image tokens plus
`--text-tokens` text tokens and random 336 px images. Reported: step time, tokens/s, GPU peak and training memory
(peak allocated minus allocated after the engine is built), and model-FLOPs utilisation: the method's training
FLOPs per step over the GPU's dense bf16 peak. FLOPs: every linear and convolution layer of a profiled forward of
the whole model (the vision tower, the projector and the language model over all tokens, the 576 image tokens
included) counted 2 x MACs forward, plus the backward's weight-gradient half only for trainable layers and its
input-gradient half wherever a gradient flows (as in the `methods` suite), plus attention score and value products (4 B L^2 d per layer,
language and vision, x3 with a backward).

Without CUDA the suite writes a document that says it was skipped (`--allow-cpu` runs the same code, sizing
included, on the CPU with a small preset and the host's memory, to check the code path).
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

from raymed.bench.common import header, ratio, result, target, targets_table

MARK = "RAYMED_BENCH_GPU "
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H20": 148.0, "A100": 312.0, "A10": 125.0, "L40": 181.0,
                    "L4": 121.0, "B200": 2250.0}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU (longest matching key), else None."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


# ---- sizing: each part from the device's memory, before anything is built ---------------------------------------
HEADROOM = 0.85  # of the free device memory: CUDA context, allocator fragmentation, NCCL buffers
ADAM_BYTES = 18  # per trainable parameter: bf16 weights and grads, fp32 master, Adam m and v (16 B), and the fp32
# gradient DeepSpeed's bf16 optimizers hold at the step (2 B amortised over its sub-groups); no offload
FROZEN_BYTES = 2  # per frozen parameter (bf16 weights)
ACT_BYTES = 34  # activation bytes per token per hidden unit per layer, bf16, flash/SDPA attention (no L^2 term)


def model_shape(cfg: Any) -> dict[str, int]:
    """Parameter counts of a LLaVA config (a meta-device build): per language layer, the rest, and the sizes that
    set activation memory."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    layers = model.model.language_model.layers
    layer = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    vc, tc = cfg.vision_config, cfg.text_config
    return {"fixed_params": total - layer * len(layers), "layer_params": layer, "layers": len(layers),
            "hidden": tc.hidden_size, "vision_hidden": vc.hidden_size, "vision_layers": vc.num_hidden_layers,
            "image_tokens": (vc.image_size // vc.patch_size) ** 2}


def part_bytes(shape: dict[str, int], depth: int, batch: int, text_tokens: int, trainable_all: bool) -> int:
    """Estimated peak device bytes of one training step at language depth `depth`: weights (+ gradients and plain
    Adam state for `full`), activations of the vision tower and of every language layer."""
    params = shape["fixed_params"] + depth * shape["layer_params"]
    tokens = batch * (1 + shape["image_tokens"] + text_tokens)
    vis = ACT_BYTES * batch * (shape["image_tokens"] + 1) * shape["vision_hidden"] * shape["vision_layers"]
    act = ACT_BYTES * tokens * shape["hidden"] * depth + vis
    return params * (ADAM_BYTES if trainable_all else FROZEN_BYTES) + act


def size_parts(device_bytes: int, shape: dict[str, int], batch: int, text_tokens: int,
               headroom: float = HEADROOM) -> dict[str, Any]:
    """What the bench runs on a device of `device_bytes` free memory: the batch (halved from `batch` until `ln` fits
    at the model's full depth) and the deepest language model at which `full` fits with plain GPU Adam (the depth
    `ln`/`attn`/`ffn`/`lora`/`full` are compared at). Raises ValueError when not even one layer fits."""
    budget = int(device_bytes * headroom)
    while batch > 1 and part_bytes(shape, shape["layers"], batch, text_tokens, False) > budget:
        batch //= 2
    if part_bytes(shape, shape["layers"], batch, text_tokens, False) > budget:
        raise ValueError(f"ln at full depth does not fit {device_bytes / 2**30:.1f} GiB even at batch 1")
    depth = shape["layers"]
    while depth > 0 and part_bytes(shape, depth, batch, text_tokens, True) > budget:
        depth -= 1
    if depth == 0:
        raise ValueError(f"full fine-tuning does not fit {device_bytes / 2**30:.1f} GiB with one language layer")
    return {"device_bytes": device_bytes, "budget_bytes": budget, "batch": batch, "compare_depth": depth,
            "full_depth": shape["layers"],
            "full_bytes": part_bytes(shape, depth, batch, text_tokens, True),
            "ln_full_depth_bytes": part_bytes(shape, shape["layers"], batch, text_tokens, False)}


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
    from raymed.models.methods import apply_method

    cuda = torch.cuda.is_available() and not spec.get("cpu")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    init_single_process_group("nccl" if cuda else "gloo")
    from raymed.train.engine import build_engine  # imports deepspeed: after the process group

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
    from raymed.models.convert import main as convert_main
    from raymed.train.launch import fit

    try:  # the release-layout stand-in is a test fixture: in a source checkout, not in the wheel
        from tests.fixtures.llava_release import write_llava_med_v15
    except ImportError as e:
        return {"error": f"part (a) runs from a raymed source checkout (tests/fixtures/llava_release.py): {e}"}
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
            **{k: m[k] for k in sorted(m)
               if k.startswith(("loss", "eval/test/", "zeroshot/test/", "peak", "tokens_per_s"))
               and not k.endswith(("n_closed", "n_open"))}}


PARTS = ("full", "ln", "attn", "ffn", "lora")


def run(model: str = "llava-med-v1.5", batch_size: int = 4, text_tokens: int = 64, steps: int = 5, warmup: int = 2,
        ln_zero_stage: int = 3, peak: float | None = None, allow_cpu: bool = False, with_recipe: bool = True,
        device_gb: float | None = None, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Sizes the parts from the device's free memory (`size_parts`, before anything is built), then runs each in a
    fresh process: `parts` at the deepest language model where `full` fits with plain GPU Adam, and `ln` at the
    model's full depth. `device_gb` overrides the memory the sizing assumes (the CPU dry run: the host's)."""
    import torch

    started = time.time()
    cuda = torch.cuda.is_available()
    config = {"model": model, "batch_size": batch_size, "text_tokens": text_tokens, "steps": steps, "warmup": warmup,
              "ln_zero_stage": ln_zero_stage, "parts": list(parts)}
    if not cuda and not allow_cpu:
        msg = "skipped: no CUDA device (the gpu suite needs one; run it on a GPU machine)"
        print(f"[bench gpu] {msg}", flush=True)
        return result("gpu", config, [], [], started, skipped=msg)
    from raymed.bench.common import model_ref

    shape = model_shape(model_ref(model).preset.build_config())
    free = torch.cuda.mem_get_info()[0] if cuda else _host_available()
    sizing = size_parts(int(device_gb * 2**30) if device_gb else free, shape, batch_size, text_tokens)
    config.update({"shape": shape, "sizing": sizing, "batch_size": sizing["batch"],
                   "params": shape["fixed_params"] + shape["layers"] * shape["layer_params"]})
    print(f"[bench gpu] sizing for {sizing['device_bytes'] / 2**30:.1f} GiB: batch {sizing['batch']}, parts at "
          f"{sizing['compare_depth']} of {shape['layers']} language layers", flush=True)
    recipe_out = recipe(cuda) if with_recipe else {"skipped": "--no-recipe"}
    print(f"[bench gpu] recipe: {recipe_out.get('error') or recipe_out.get('skipped') or 'ok'} "
          f"({recipe_out.get('wall_s', 0):.0f} s)", flush=True)
    runs = [(m, sizing["compare_depth"]) for m in parts] + [("ln", shape["layers"])]
    rows = []
    for method, depth in runs:
        spec = {"model": model, "method": method, "zero_stage": 3 if method == "full" else ln_zero_stage,
                "offload_optimizer": False, "batch_size": sizing["batch"], "text_tokens": text_tokens,
                "steps": steps, "warmup": warmup, "language_layers": depth, "peak_tflops": peak, "cpu": not cuda}
        out = _child(spec)
        out.setdefault("language_layers", depth)
        rows.append(out)
        print(f"[bench gpu] {method} @ {depth} layers: {_status(out)}", flush=True)
    return result("gpu", config, rows, _targets(rows, recipe_out), started, recipe=recipe_out)


def _targets(rows: list[dict[str, Any]], recipe_out: dict[str, Any]) -> list[dict[str, Any]]:
    """ln/full step and memory at the compared depth; ln MFU at full depth; the recipe runs."""
    ok = [r for r in rows if "error" not in r]
    full = next((r for r in ok if r["method"] == "full"), None)
    targets = []
    for r in ok:
        if full is not None and r["language_layers"] == full["language_layers"]:
            r["step_ratio"], r["mem_ratio"] = ratio(r["step_s"], full["step_s"]), ratio(r["train_mem_mb"],
                                                                                        full["train_mem_mb"])
    ln = next((r for r in ok if r["method"] == "ln" and full and r["language_layers"] == full["language_layers"]), None)
    if ln is not None:
        targets += [target("ln/full training memory (GPU)", ln["mem_ratio"], 0.30, "<=",
                           "peak allocated - allocated after engine build"),
                    target("ln/full step time (GPU)", ln["step_ratio"], 0.70, "<=", "")]
    deepest = max((r for r in ok if r["method"] == "ln"), key=lambda r: r["language_layers"], default=None)
    if deepest is not None and deepest.get("mfu") is not None:
        targets.append(target(f"ln MFU at {deepest['language_layers']} layers", deepest["mfu"], 0.35, ">=",
                              "model FLOPs incl. vision tower and image tokens / dense bf16 peak"))
    if len(ok) < len(rows):
        targets.append(target("parts that ran", len(ok), len(rows), ">=",
                              "; ".join(f"{r['method']}: {r['error'][:120]}" for r in rows if "error" in r)))
    if recipe_out.get("error"):
        targets.append(target("recipe (Ray Train, NCCL, bf16) runs", 0, 1, ">=", recipe_out["error"][:200]))
    return targets


def _status(out: dict[str, Any]) -> str:
    return out.get("error") or f"{out['step_s']:.3f} s/step, peak {out['peak_mb']:.0f} MB"


def _host_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


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


COLUMNS = [("method", "method"), ("language_layers", "layers"), ("zero_stage", "ZeRO"), ("trainable", "trainable"),
           ("step_s", "step s"), ("step_ratio", "x full"), ("tokens_per_s", "tokens/s"),
           ("peak_mb", "peak MB"), ("train_mem_mb", "train MB"), ("mem_ratio", "x full"), ("tflops_per_s", "TFLOP/s"),
           ("mfu", "MFU")]


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
        f"({c['shape']['image_tokens']} image + {c['text_tokens']} text tokens), {c['steps']} timed steps after "
        f"{c['warmup']}; sized for {c['sizing']['device_bytes'] / 2**30:.1f} GiB free: parts at "
        f"{c['sizing']['compare_depth']} of {c['shape']['layers']} language layers (full with plain Adam, est. "
        f"{c['sizing']['full_bytes'] / 2**30:.1f} GiB of a {c['sizing']['budget_bytes'] / 2**30:.1f} GiB budget)",
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
    ap.add_argument("--device-gb", type=float, default=None,
                    help="memory the sizing assumes (default: the GPU's free memory; the host's with --allow-cpu)")
    ap.add_argument("--parts", default=",".join(PARTS), help="methods compared at the depth where full fits")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak, if not known")
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # code-path check with a tiny preset


def from_args(args: Any) -> dict[str, Any]:
    return run(model=args.model, batch_size=args.batch_size, text_tokens=args.text_tokens, steps=args.steps,
               warmup=args.warmup, ln_zero_stage=args.ln_zero_stage, peak=args.peak_tflops, allow_cpu=args.allow_cpu,
               with_recipe=args.with_recipe, device_gb=args.device_gb, parts=tuple(args.parts.split(",")))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(MARK + json.dumps(measure(json.loads(Path(argv[0]).read_text()))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
