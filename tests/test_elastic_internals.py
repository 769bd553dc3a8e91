"""Every private DeepSpeed / torch attribute `raymed.elastic` reads or writes, on the installed versions' real objects.

`raymed.elastic` re-shards optimizer state itself because DeepSpeed's Universal Checkpointing does not cover
raymed's elastic cases (docs/DESIGN.md §6.3). It reaches into internals that no release promises to keep; several
are read with `getattr(..., None)` or `hasattr`, so a release that renamed one would not fail there but restore
the wrong state. An upgrade that removes any of them fails here, naming the attribute.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from raymed.config import load_config
from raymed.elastic import base_optimizer
from raymed.engine import build_engine

pytestmark = pytest.mark.integration


class Frozen(nn.Module):
    """Most parameters frozen, as in raymed's methods: a frozen matrix large enough for ZeRO-3 to partition, a
    trainable norm and a trainable head whose size (8 x 256 + 8) is not a multiple of every world size."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(512, 256).requires_grad_(False)
        self.norm = nn.LayerNorm(256)
        self.head = nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(x)))


def _engine_after_a_step(stage: int):
    torch.manual_seed(0)
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "deepspeed.shard_single_worker=true",
                             "train.batch_size=2"])
    engine = build_engine(Frozen(), cfg, bf16=False, world=1, total_steps=4)
    assert engine.zero_optimization_stage() == stage
    loss = engine(torch.randn(2, 512)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return engine


def _has(obj: object, name: str, where: str) -> None:
    assert hasattr(obj, name), f"{where}: {type(obj).__module__}.{type(obj).__qualname__} has no {name!r} " \
                               "(used by raymed.elastic): re-check elastic resumes against this DeepSpeed/torch"


def _takes(method: object, params: set[str], where: str) -> None:
    missing = params - set(inspect.signature(method).parameters)
    assert not missing, f"{where}: {method} takes no {sorted(missing)} (raymed.elastic passes them by name)"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_every_private_attribute_elastic_uses_exists(one_rank, stage):
    import deepspeed.utils as ds_utils

    engine = _engine_after_a_step(stage)
    for name in ("safe_get_full_fp32_param", "safe_get_full_optimizer_state", "safe_set_full_fp32_param",
                 "safe_set_full_optimizer_state"):
        _has(ds_utils, name, "gather_state / load_portable")
    for name in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler", "optimizer", "module"):
        _has(engine, name, "_counters / load_portable")
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    opt = base_optimizer(engine)
    assert isinstance(opt, torch.optim.Optimizer) and opt.state, "base_optimizer: not the stepped torch optimizer"

    if stage == 0:  # the plain torch optimizer owns the module's parameters: no DeepSpeed fragments
        assert engine.optimizer is opt
        assert not any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in trainable), "_fragmented"
        assert all(set(opt.state[p]) >= {"step", "exp_avg", "exp_avg_sq"} for p in trainable), "_adam_step"
    elif stage in (1, 2):
        _has(engine.optimizer, "optimizer", "base_optimizer")
        _has(engine.optimizer, "_lazy_init_hp_params_optimizer_state", "gather_state / _ensure_adam_state")
        for p in trainable:
            _has(p, "_hp_mapping", "_fragmented")
    else:
        _has(engine.optimizer, "optimizer", "base_optimizer")
        _has(engine.optimizer, "fp32_partitioned_groups_flat", "_ensure_adam_state")
        for p in trainable:
            _has(p, "ds_id", "_fragmented / load_portable")
            _has(p, "_z3_optimizer", "_z3_set_full")
        z3 = trainable[0]._z3_optimizer
        for name in ("_get_fp32_opt_state_partition", "_get_param_partition_rank", "_swappable_optimizer_subgroup",
                     "_optimizer_states_and_gradient_swap_out"):
            _has(z3, name, "_z3_set_full")
        _takes(z3._get_fp32_opt_state_partition, {"release_swap_buffers", "optim_state_key"}, "_z3_set_full")

    sched = engine.lr_scheduler  # sync_lr sets LambdaLR's position by hand
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    for name in ("last_epoch", "base_lrs", "lr_lambdas", "optimizer", "_last_lr"):
        _has(sched, name, "sync_lr")
    sched._last_lr = [0.125] * len(sched.base_lrs)
    assert sched.get_last_lr() == sched._last_lr, "sync_lr: get_last_lr no longer reads _last_lr"
