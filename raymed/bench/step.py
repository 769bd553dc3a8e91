"""One method's training steps in a fresh process: `python -m raymed.bench.step SPEC.json`.

A plain PyTorch loop (forward, backward, AdamW over the trainable parameters only, `zero_grad`) on one
fixed batch. Each method runs in its own process so that peak-memory figures do not mix: training
memory = peak RSS during the steps minus RSS of the loaded model (+ method + batch) just before them.

Before timing, one profiled forward pass (autograd on, no backward) records what the cost model of
DESIGN.md §5 needs: the FLOPs of every linear/conv call and whether autograd will compute its input
gradient (input requires grad) and its weight gradient (weight trainable), and the bytes autograd saves
for backward (activations; parameters excluded). The expected step cost is then
`sum(F) + sum(F if input needs grad) + sum(F if weight trainable)` over those calls.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

MARK = "RAYMED_BENCH_RESULT "


def profile_pass(model: Any, batch: Mapping[str, Any]) -> dict[str, float]:
    """FLOPs (forward / input-grad / weight-grad, linear and conv layers) and saved-activation bytes."""
    import torch
    from torch import nn

    flops = {"forward": 0.0, "input_grad": 0.0, "weight_grad": 0.0}
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0]
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, nn.Linear):
            f = 2.0 * out.numel() * module.in_features
        else:  # Conv2d
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            f = 2.0 * out.numel() * k
        flops["forward"] += f
        if x.requires_grad:
            flops["input_grad"] += f
        if module.weight.requires_grad:
            flops["weight_grad"] += f

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
        del out
    finally:
        for h in handles:
            h.remove()
    cost = flops["forward"] + flops["input_grad"] + flops["weight_grad"]
    return {**flops, "step_flops": cost, "saved_activation_mb": sum(saved.values()) / 2**20}


def run(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Build, apply the method, profile, then time `warmup + steps` training steps on one batch."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from raymed.bench.common import model_ref, peak_rss_mb, release_memory, reset_peak_rss, rss_mb
    from raymed.methods import apply_method
    from raymed.models import load_model

    t0 = time.perf_counter()
    ref = model_ref(spec["model"])
    model = load_model(ref, seed=int(spec.get("seed", 0)))
    model, acc = apply_method(model, ref, spec["method"], spec.get("towers"), spec.get("options"))
    if spec.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = torch.load(spec["batch"])
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # torch's default AdamW (the for-each-tensor CPU path), as the recipe's client optimizer; `fused` on request.
    optimizer = torch.optim.AdamW(trainable, lr=float(spec.get("lr", 1e-4)), fused=bool(spec.get("fused_adamw")) or None)
    profile = profile_pass(model, batch)
    build_s = time.perf_counter() - t0

    release_memory()
    loaded = rss_mb()
    peak_reset = reset_peak_rss()
    times, cpu, phases, losses = [], [], [], []
    for _ in range(int(spec["warmup"]) + int(spec["steps"])):
        t, c = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        times.append(t3 - t)
        cpu.append(time.process_time() - c)  # all threads; less sensitive than wall time to other load
        phases.append([t1 - t, t2 - t1, t3 - t2])
        losses.append(float(loss.detach()))
    peak = peak_rss_mb()
    tokens = int(batch["attention_mask"].sum())
    return {
        "method": spec["method"], "towers": spec.get("towers"), "trainable": acc.trainable, "total": acc.total,
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "step_s": times[int(spec["warmup"]):], "warmup_s": times[: int(spec["warmup"])],
        "cpu_s": cpu[int(spec["warmup"]):], "phases_s": phases[int(spec["warmup"]):],
        "loaded_mb": loaded, "peak_mb": peak, "train_mem_mb": peak - loaded, "peak_reset": peak_reset,
        "build_s": build_s, "losses": losses, "batch_size": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]), "tokens": tokens, "threads": torch.get_num_threads(),
        **profile,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    print(MARK + json.dumps(run(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
