"""The DeepSpeed engine as the worker builds it (raymed.train.engine), in this process: one gloo rank, real DeepSpeed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raymed.config import load_config
from raymed.train.engine import build_engine, ds_config

pytestmark = pytest.mark.integration


class Block(nn.Module):
    """A weight larger than DeepSpeed's ZeRO-3 persistence threshold (1e5 elements: it is partitioned), a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(512, 256)
        self.norm = nn.LayerNorm(256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def test_zero3_decays_matrices_of_weights_partitioned_while_loading(one_rank):
    """Weights partitioned as they load (ZeRO-3 `zero.Init`, as `from_pretrained` under HfDeepSpeedConfig does) are
    empty 1-d tensors when the optimizer is built: weight decay must still go by their full shape (`ds_shape`)."""
    import deepspeed

    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.shard_single_worker=true", "train.weight_decay=0.05"])
    ds = ds_config(cfg, world=1, bf16=False)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = Block()
    assert model.proj.weight.numel() == 0 and tuple(model.proj.weight.ds_shape) == (256, 512)  # partitioned
    engine = build_engine(model, cfg, bf16=False, world=1, total_steps=4, ds_cfg=ds)
    assert engine.zero_optimization_stage() == 3
    decays = sorted(group["weight_decay"] for group in engine.optimizer.param_groups)
    assert decays == [0.0, 0.05]  # matrices decay, norms and biases do not (all went undecayed before)

    # the MISS authors' policy (`train.decay_norms_and_biases`): every parameter decays, norms and biases included
    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.shard_single_worker=true",
                             "train.weight_decay=0.05", "train.decay_norms_and_biases=true"])
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = Block()
    engine = build_engine(model, cfg, bf16=False, world=1, total_steps=4, ds_cfg=ds)
    assert [g["weight_decay"] for g in engine.optimizer.param_groups] == [0.05]  # one group: all four decay


def test_one_rank_stage0_skips_the_gradient_allreduce_and_trains_as_plain_torch(one_rank):
    """One data-parallel rank at stage 0: no flatten / all-reduce / copy-back of the gradients after backward (they
    would change nothing), and the engine's steps equal plain torch's (same AdamW, clipping and schedule)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import get_cosine_schedule_with_warmup

    cfg = load_config(None, ["deepspeed.zero_stage=0", "train.max_grad_norm=0.5", "train.lr=0.01"])
    torch.manual_seed(0)
    model, plain = Block(), Block()
    plain.load_state_dict(model.state_dict())
    engine = build_engine(model, cfg, bf16=False, world=1, total_steps=3)
    assert engine.zero_optimization_stage() == 0 and not engine.enable_backward_allreduce
    groups = [{"params": [plain.proj.weight], "weight_decay": cfg.train.weight_decay},
              {"params": [plain.proj.bias, plain.norm.weight, plain.norm.bias], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)
    sched = get_cosine_schedule_with_warmup(opt, 1, 3)
    for step in range(3):
        x = torch.randn(4, 512, generator=torch.Generator().manual_seed(step))
        loss = engine(x).pow(2).mean() * 100  # large gradients: clipping acts
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.backward(loss)
        assert not [e.name for e in prof.events() if "all_reduce" in e.name or "allreduce" in e.name
                    or e.name == "aten::cat"]
        engine.step()
        (plain(x).pow(2).mean() * 100).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)
