"""The training step never waits for the device (#24): the worker's `TrainStep` over a stretch of steps between log
intervals runs no `aten::_local_scalar_dense` (the op behind `.item()`, `float(t)`, `int(t)`), counted with
torch.profiler on a tiny LLaVA under the real DeepSpeed engine (one gloo rank)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from raymed.config import load_config
from raymed.engine import build_engine
from raymed.methods import apply_method
from raymed.models import load_model, load_processor, resolve
from raymed.worker import TrainStep
from tests.conftest import make_rows

pytestmark = pytest.mark.integration
SYNC_OP = "aten::_local_scalar_dense"


@pytest.fixture()
def one_rank(monkeypatch):
    import deepspeed

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29541", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()


def test_no_host_sync_between_log_intervals(one_rank):
    cfg = load_config(None, ["model.name=tiny-llava", "method.name=ln", "train.grad_accum=2"])
    ref = resolve(cfg.model.name)
    processor = load_processor(ref)
    model, _ = apply_method(load_model(ref), ref, cfg.method.name)
    engine = build_engine(model, cfg, bf16=False, world=1, total_steps=8)
    batches = [{k: torch.from_numpy(v) for k, v in ref.family.encode(processor, make_rows(2, seed=s), train=True,
                                                                       max_length=96).items()} for s in range(6)]
    step = TrainStep(engine, ref.family, processor, torch.device("cpu"), bf16=False, world=1,
                     pad_to_multiple_of=8, grad_accum=2)
    step(batches[0], 0, len(batches))  # warm-up, outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for index in range(1, len(batches)):
            step(batches[index], index, len(batches))
    syncs = [e for e in prof.events() if e.name == SYNC_OP]
    assert step.n_losses == len(batches) and engine.global_steps == 3  # optimizer steps ran inside the profile
    assert step.stats["tokens"] < step.stats["padded_tokens"] <= 6 * 2 * 96
    assert not syncs, f"{len(syncs)} host syncs in 5 profiled micro-batches: " + ", ".join(
        sorted({str(e.cpu_parent.name) if e.cpu_parent else "?" for e in syncs}))
    assert float(step.loss_sum) > 0  # the loss is there, read once, at the end
