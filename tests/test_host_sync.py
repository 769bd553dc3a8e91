"""The training step never waits for the device: losses and token counts stay there and the host reads them only at
`train.log_every` steps. Counted with the PyTorch profiler on the worker's own step (`raymed.train.recipe.train_step`,
real DeepSpeed engine on one gloo rank): `aten::_local_scalar_dense` is the op behind `.item()` / `float(t)` /
`int(t)`, every device-to-host read of a value. Each read is attributed by the ops and Python frames above it:
- the model's: transformers' LLaVA reads values in its forward (the image-token count check, the SDPA mask's padding
  check) and its backward (`masked_scatter`'s gradient needs the count of image positions);
- the fused AdamW kernel's on CPU (its CPU implementation reads the step and lr scalars; on a GPU they stay on the
  device, which is why raymed uses the fused kernel: the unfused update reads every step counter);
- everything else is the loop's (raymed, DeepSpeed): there must be none between log intervals."""

from __future__ import annotations

import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from raymed.config import load_config
from raymed.models import load_processor, resolve
from raymed.telemetry import Telemetry
from raymed.tracking import RunTracker
from raymed.train.recipe import Run, build_model_and_engine, train_step
from tests.conftest import make_rows

pytestmark = pytest.mark.integration
STEPS = 6


def reads(log_every: int, grad_accum: int) -> tuple[int, int]:
    """(reads outside the model's transformers code, reads inside it) over a stretch of steps."""
    cfg = load_config(None, ["model.name=tiny-llava", "method.name=ln", f"train.log_every={log_every}",
                             f"train.grad_accum={grad_accum}", "train.batch_size=2", "data.max_length=48"])
    ref = resolve(cfg.model.name)
    engine, acc, schedule = build_model_and_engine(cfg, ref, 0, 1, STEPS // grad_accum)
    processor = load_processor(ref)
    enc = ref.family.encode(processor, make_rows(2), train=True, max_length=48)
    batch = {k: torch.from_numpy(v) for k, v in enc.items()}
    run = Run(cfg, {"run_name": "sync"}, 0, 1, torch.device("cpu"), [None], ref, processor, acc, engine, schedule,
              None, None,
              Telemetry("sync", "ln", 0, 1, enabled=False), RunTracker([], "sync", None, log_every, STEPS, print),
              print, STEPS, STEPS // grad_accum,
              {"samples": 0, "tokens": 0, "padded_tokens": 0, "train_s": 0.0})
    engine.train()
    train_step(run, batch, 0, time.perf_counter())  # warm-up (first-call allocations)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:  # with_stack: Python frames as events
        for index in range(1, STEPS):
            train_step(run, batch, index, time.perf_counter())
    owners = [owner(e) for e in prof.events() if e.name == "aten::_local_scalar_dense"]
    return owners.count("loop"), owners.count("model")


def owner(event) -> str:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    if any(n == "aten::_fused_adamw_" for n in names):
        return "optimizer kernel"
    if any("transformers/" in n or n.startswith("autograd::engine::evaluate_function") for n in names):
        return "model"
    return "loop"


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_no_host_read_between_log_intervals(one_rank, grad_accum):
    ours, model = reads(log_every=0, grad_accum=grad_accum)
    assert ours == 0 and model > 0  # the profiler sees reads (the model's), none of the loop's or the optimizer's
    ours, _ = reads(log_every=1, grad_accum=grad_accum)
    assert ours > 0  # and a read of the loop's when a log is due
