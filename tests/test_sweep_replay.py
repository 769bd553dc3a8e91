"""ASHA replayed on recorded learning curves (`raymed.bench.sweep`): pure functions, Ray's own ASHA scheduler."""

from types import SimpleNamespace

import pytest

from raymed.bench.sweep import best, method_bests, replay, replay_asha


def test_asha_replay_follows_ray_rules():
    # Ray's ASHA: the first trial at a rung always goes on; a later one goes on when it is not below the
    # running median of those recorded there. Best trial first: every other trial stops at the first rung.
    down = {f"t{i}": [(7 - i) / 10] * 3 for i in range(8)}
    assert replay_asha(down, max_t=3, grace=1, rf=2, mode="max", concurrency=8) == {"t0": 3, **{f"t{i}": 1 for i in
                                                                                               range(1, 8)}}
    # Worst first, each better than the last: nobody is ever below the median, so nothing stops.
    up = {f"t{i}": [i / 10] * 3 for i in range(8)}
    assert set(replay_asha(up, max_t=3, grace=1, rf=2, mode="max", concurrency=8).values()) == {3}
    assert set(replay_asha(up, max_t=3, grace=1, rf=2, mode="min", concurrency=8).values()) == {1, 3}
    grid = [{"trial_id": t, "method": f"m{t}", "lr": 0.1, "curve": c, "final": c[-1], "epochs": 3}
            for t, c in down.items()]
    rows = replay(grid, 3, [(2, 1), (4, 1)], "max", [1, 8])
    assert len(rows) == 4
    for row in rows:
        assert row["grid_trial_epochs"] == 24 and row["ratio"] == row["trial_epochs"] / 24
        assert row["same_best"] and row["best_method"] == "mt0"
    assert rows[0]["trial_epochs"] == 10
    assert best(grid, "min")["method"] == "mt7"


def test_replay_shows_which_methods_a_short_grace_period_loses():
    # Two methods. `fast` is good after one epoch and stays there; `slow` starts below it (a few-parameter
    # method warming up at a high lr) and ends above it. Grace 1 stops `slow` after its first epoch, so the
    # comparison would report it at its start; grace 3 (= max_t) lets every trial finish.
    curves = {"f1": [0.7, 0.7, 0.7], "f2": [0.68, 0.69, 0.7], "s1": [0.5, 0.6, 0.8], "s2": [0.55, 0.6, 0.75]}
    method = {"f1": "fast", "f2": "fast", "s1": "slow", "s2": "slow"}
    grid = [{"trial_id": t, "method": method[t], "lr": 0.1, "curve": c, "final": c[-1], "epochs": 3}
            for t, c in curves.items()]
    assert method_bests(grid, "max") == {"fast": 0.7, "slow": 0.8}
    short, full, per_method = replay(grid, 3, [(2, 1), (3, 3), (2, 1, "method")], "max", [1])
    assert short["methods_below_grid"] == "slow"
    assert short["per_method"]["slow"] == {"grid": 0.8, "asha": 0.55}
    assert short["best_method"] == "fast" and not short["same_best"]
    assert full["methods_below_grid"] == "-" and full["same_best"] and full["trial_epochs"] == 12
    # One bracket per method: each method's first trial goes on; f2 is below f1 at the first rung and stops,
    # s2 is above s1 there and level with it at the second, so it runs on.
    assert per_method["methods_below_grid"] == "-" and per_method["same_best"]
    assert per_method["trial_epochs"] == 3 + 1 + 3 + 3 and "per method" in per_method["scheduler"]


def _trial(tid, method):  # what the scheduler reads of Tune's Trial: its id and its config
    from types import SimpleNamespace

    return SimpleNamespace(trial_id=tid, config={"base": {}, "grid": {"method.name": method, "train.lr": 0.1},
                                                 "sampled": {}})


def test_asha_per_method_compares_a_trial_with_its_own_method_only():
    # Ray's ASHA (rf 2, grace 1) with one bracket per method: `slow` starts far below `fast` and would be
    # stopped at the first rung by the plain scheduler; per method, each method's first trial goes on and
    # only a method's weaker trial stops.
    from ray.tune.schedulers import TrialScheduler

    from raymed.tune.sweep import SweepConfig, make_scheduler

    def decisions(per):
        sweep = SweepConfig.model_validate({"search": {"method.name": ["fast", "slow"], "train.lr": [0.1]},
                                            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2,
                                                          "per": per}})
        sched = make_scheduler(sweep, max_t=3)
        sched.set_search_properties("acc", "max")
        out = {}
        for tid, method, acc in [("f1", "fast", 0.8), ("s1", "slow", 0.5), ("f2", "fast", 0.6), ("s2", "slow", 0.4)]:
            trial = _trial(tid, method)
            sched.on_trial_add(None, trial)
            out[tid] = sched.on_trial_result(None, trial, {"epoch": 1, "acc": acc})
        return out

    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert decisions(None) == {"f1": go, "s1": stop, "f2": stop, "s2": stop}
    assert decisions("method.name") == {"f1": go, "s1": go, "f2": stop, "s2": stop}


def test_paper_sweep_has_no_duplicate_trials_and_brackets_per_method_and_towers():
    from raymed.tune.sweep import GroupedScheduler, grid_points, load_sweep, make_scheduler

    sweep, base = load_sweep("configs/sweeps/llava-med-vqa-rad.yaml", [], check_paths=False)
    points = grid_points(sweep, base)
    # 6 methods x 2 tower choices x 3 lrs, but prefix attaches to the language model under either choice.
    assert len(points) == 6 * 2 * 3 - 3
    assert sum(p["method.name"] == "prefix" for p in points) == 3
    sched = make_scheduler(sweep, max_t=6)
    assert isinstance(sched, GroupedScheduler)
    sched.set_search_properties("acc", "max")
    for tid, towers in [("a", None), ("b", ["language"])]:
        sched.on_trial_add(None, _trial(tid, "ln") if towers is None else SimpleNamespace(
            trial_id=tid, config={"grid": {"method.name": "ln", "method.towers": towers}, "sampled": {}}))
    assert sched.group_of["a"] != sched.group_of["b"]  # ln on all towers and ln on the language model apart


def test_a_grace_period_inside_the_warmup_is_refused():
    from raymed.config import ConfigError
    from raymed.tune.sweep import load_sweep

    with pytest.raises(ConfigError, match="grace_period: 1 epoch.*warm-up \\(1.8 epochs"):
        load_sweep(None, ["train.epochs=9", "train.warmup_ratio=0.2", "sweep.scheduler.grace_period=1"])
