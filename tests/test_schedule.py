"""The learning-rate schedules (raymed.train.engine.Schedule) against the formulas they stand for."""

from __future__ import annotations

import math

import pytest

from raymed.config import load_config
from raymed.train.engine import Schedule


def test_cosine_per_epoch_is_the_miss_authors_schedule():
    """TIMMY-CHAN/MISS `cosine_lr_schedule(optimizer, epoch, max_epoch, init_lr, min_lr)`, called at each epoch's
    start: `lr = (init - min) * 0.5 * (1 + cos(pi * epoch / max_epoch)) + min`, min 0, held for the epoch."""
    epochs, per = 5, 3
    cfg = load_config(None, ["train.schedule=cosine-per-epoch", "train.warmup_ratio=0", f"train.epochs={epochs}"])
    schedule = Schedule.for_run(cfg, epochs * per, per)
    got = [schedule(step) for step in range(epochs * per)]
    want = [0.5 * (1 + math.cos(math.pi * (step // per) / epochs)) for step in range(epochs * per)]
    assert got == pytest.approx(want, abs=1e-12)
    assert schedule(epochs * per) == pytest.approx(0.0, abs=1e-12)  # reaches 0 after the last epoch


def test_per_step_cosine_is_transformers_cosine_with_warmup():
    from torch import nn, optim
    from transformers import get_cosine_schedule_with_warmup

    cfg = load_config(None, ["train.warmup_ratio=0.1", "train.epochs=2"])
    schedule = Schedule.for_run(cfg, 40, 20)
    opt = optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=40)
    want = []
    for _ in range(41):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    assert [schedule(s) for s in range(41)] == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("total", [1, 2, 3])
def test_a_run_shorter_than_its_warmup_still_ends_at_zero(total):
    """A 1-step run (a tiny split) with warm-up: the warm-up used to take every step and the lr ended at its peak."""
    cfg = load_config(None, ["train.warmup_ratio=0.5"])
    schedule = Schedule.for_run(cfg, total, total)
    lrs = [schedule(s) for s in range(total + 1)]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and max(lrs) > 0
