"""Training steps of a plain PyTorch loop in a fresh process: `python -m raymed.bench.step SPEC.json`.

A step is forward, backward, AdamW over the trainable parameters only, `zero_grad` — on one fixed batch.
Two modes, because the two measurements need opposite things:

- `memory` (one method per process, so peaks do not mix): training memory = peak RSS during the steps
  minus RSS of the loaded model (+ method + batch + optimizer object) just before them. Before that, one
  profiled forward pass (autograd on, no backward) records what the cost model of docs/DESIGN.md §5 needs:
  the FLOPs of every linear/conv call, whether autograd will compute its input gradient (input requires
  grad) and its weight gradient (weight trainable), and the bytes autograd saves for backward.
  Expected step cost = `sum(F) + sum(F if input needs grad) + sum(F if weight trainable)`.
- `timing` (every method in one process, one step of each in turn, the order rotating every round): on a
  shared machine the load drifts over seconds to minutes, so steps of different methods taken seconds
  apart are compared under the same load; per-round ratios to `full` are then paired.
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
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, nn.Linear):
            f = 2.0 * out.numel() * module.in_features
        else:  # Conv2d
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            f = 2.0 * out.numel() * k
        flops["forward"] += f
        if inputs[0].requires_grad:
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


class Trainer:
    """One method applied to a fresh copy of the model, with its optimizer."""

    def __init__(self, spec: Mapping[str, Any], variant: Mapping[str, Any]) -> None:
        import torch

        from raymed.bench.common import model_ref
        from raymed.models.methods import apply_method
        from raymed.models import load_model

        ref = model_ref(spec["model"])
        model = load_model(ref, seed=int(spec.get("seed", 0)))
        self.model, self.acc = apply_method(model, ref, variant["method"], variant.get("towers"), variant.get("options"))
        if spec.get("gradient_checkpointing"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # torch's default AdamW (the for-each-tensor CPU path, as the recipe's client optimizer); fused on request.
        self.optimizer = torch.optim.AdamW(self.trainable, lr=float(spec.get("lr", 1e-4)),
                                           fused=bool(spec.get("fused_adamw")) or None)

    def step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One training step: wall time, CPU time of all threads, and its forward/backward/AdamW phases."""
        t, c = time.perf_counter(), time.process_time()
        loss = self.model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"wall": t3 - t, "cpu": time.process_time() - c, "phases": [t1 - t, t2 - t1, t3 - t2],
                "loss": float(loss.detach())}

    def facts(self) -> dict[str, Any]:
        return {"trainable": self.acc.trainable, "total": self.acc.total,
                "trainable_bytes": sum(p.numel() * p.element_size() for p in self.trainable)}


def run_memory(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One variant: profile, then the peak RSS of `warmup + steps` steps above the loaded state."""
    import torch

    from raymed.bench.common import peak_rss_mb, release_memory, reset_peak_rss, rss_mb

    t0 = time.perf_counter()
    variant = spec["variants"][0]
    trainer = Trainer(spec, variant)
    batch = torch.load(spec["batch"])
    profile = profile_pass(trainer.model, batch)
    build_s = time.perf_counter() - t0
    release_memory()
    loaded = rss_mb()
    peak_reset = reset_peak_rss()
    steps = [trainer.step(batch) for _ in range(int(spec["warmup"]) + int(spec["steps"]))]
    peak = peak_rss_mb()
    return {
        "method": variant["method"], "towers": variant.get("towers"), **trainer.facts(), **profile,
        "loaded_mb": loaded, "peak_mb": peak, "train_mem_mb": peak - loaded, "peak_reset": peak_reset,
        "build_s": build_s, "step_s": [s["wall"] for s in steps[int(spec["warmup"]):]],
        "losses": [s["loss"] for s in steps], "batch_size": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]), "tokens": int(batch["attention_mask"].sum()),
        "threads": torch.get_num_threads(),
    }


def run_timing(spec: Mapping[str, Any]) -> dict[str, Any]:
    """All variants in this process; each round takes one step of every variant, order rotating."""
    import torch

    batch = torch.load(spec["batch"])
    trainers = [Trainer(spec, v) for v in spec["variants"]]
    n = len(trainers)
    rounds = []
    for r in range(int(spec["warmup"]) + int(spec["steps"])):
        order = [(r + i) % n for i in range(n)]
        out: list[Any] = [None] * n
        for i in order:
            out[i] = trainers[i].step(batch)
        if r >= int(spec["warmup"]):
            rounds.append(out)
        if spec.get("progress"):  # a long run on a busy machine: `tail -f` this file to follow it
            with open(spec["progress"], "a") as f:
                f.write(f"round {r + 1}: " + " ".join(f"{o['wall']:.2f}" for o in out) + "\n")
    return {"variants": [{**v, **t.facts()} for v, t in zip(spec["variants"], trainers)], "rounds": rounds,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    import torch

    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    torch.set_num_threads(int(spec["threads"]))
    out = run_memory(spec) if spec["mode"] == "memory" else run_timing(spec)
    print(MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
