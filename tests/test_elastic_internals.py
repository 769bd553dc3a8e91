"""Every private DeepSpeed / torch attribute `raymed.train.elastic` reads or writes, on the installed versions' real objects.

`raymed.train.elastic` re-shards optimizer state itself because DeepSpeed's Universal Checkpointing does not cover
raymed's elastic cases (docs/DESIGN.md §6.3). It reaches into internals that no release promises to keep; several
are read with `getattr(..., None)` or `hasattr`, so a release that renamed one would not fail there but restore
the wrong state. An upgrade that removes any of them fails here, naming the attribute.
"""

from __future__ import annotations

import inspect
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

from raymed.config import load_config
from raymed.train.elastic import base_optimizer
from raymed.train.engine import build_engine, ds_config

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


def _engine_after_a_step(stage: int, load_universal: bool = False):
    torch.manual_seed(0)
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "deepspeed.shard_single_worker=true",
                             "train.batch_size=2"])
    ds = {**ds_config(cfg, world=1, bf16=False), "checkpoint": {"load_universal": load_universal}}
    engine = build_engine(Frozen(), cfg, bf16=False, world=1, total_steps=4, ds_cfg=ds)
    assert engine.zero_optimization_stage() == stage
    return _step(engine)


def _step(engine):
    loss = engine(torch.randn(2, 512)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return engine


def _has(obj: object, name: str, where: str) -> None:
    assert hasattr(obj, name), f"{where}: {type(obj).__module__}.{type(obj).__qualname__} has no {name!r} " \
                               "(used by raymed.train.elastic): re-check elastic resumes against this DeepSpeed/torch"


def _takes(method: object, params: set[str], where: str) -> None:
    missing = params - set(inspect.signature(method).parameters)
    assert not missing, f"{where}: {method} takes no {sorted(missing)} (raymed.train.elastic passes them by name)"


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


def _to_universal(src: Path, dst: Path) -> None:
    """`python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`, in this process."""
    from deepspeed.checkpoint.ds_to_universal import main

    main(Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1, num_merge_workers=1,
                   keep_temp_folder=False, strict=True, inject_missing_state=True))
    (dst.parent / "latest_universal").write_text(dst.name)


def test_universal_checkpointing_does_not_cover_the_lone_workers_zero0(one_rank, tmp_path):
    """Why raymed.train.elastic re-shards by itself (docs/DESIGN.md §6.3): DeepSpeed's Universal Checkpointing restores
    ZeRO-2 state, but a lone fp32 worker runs stage 0, and stage 0 neither converts nor loads. When this fails,
    the installed DeepSpeed covers stage 0: consider universal checkpoints for elastic runs."""
    from deepspeed.utils import safe_get_full_fp32_param

    zero0 = _engine_after_a_step(0)
    zero0.save_checkpoint(str(tmp_path / "z0"), tag="t", exclude_frozen_parameters=True)
    with pytest.raises(FileNotFoundError, match="_optim_states.pt"):  # stage 0 writes no ZeRO optimizer files
        _to_universal(tmp_path / "z0" / "t", tmp_path / "z0u" / "t")

    zero2 = _engine_after_a_step(2)
    zero2.save_checkpoint(str(tmp_path / "z2"), tag="t", exclude_frozen_parameters=True)
    _to_universal(tmp_path / "z2" / "t", tmp_path / "z2u" / "t")
    saved = {n: safe_get_full_fp32_param(p).clone() for n, p in zero2.module.named_parameters() if p.requires_grad}
    again = _step(_engine_after_a_step(2, load_universal=True))  # one more step: other weights until loaded
    assert not torch.equal(safe_get_full_fp32_param(again.module.head.bias), saved["head.bias"])
    again.load_checkpoint(str(tmp_path / "z2u"), tag="t", load_module_strict=False, load_lr_scheduler_states=False)
    for name, p in again.module.named_parameters():
        if p.requires_grad:
            assert torch.equal(safe_get_full_fp32_param(p), saved[name]), name
    lone = _engine_after_a_step(0, load_universal=True)
    with pytest.raises(AttributeError):  # the plain optimizer is handed the ZeRO run's `optimizer: None`
        lone.load_checkpoint(str(tmp_path / "z2u"), tag="t", load_module_strict=False,
                             load_lr_scheduler_states=False)
