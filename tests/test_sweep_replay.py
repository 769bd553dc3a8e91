"""ASHA replayed on recorded learning curves (`raymed.bench.sweep`): pure functions, Ray's own `_Bracket`."""

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
    short, full = replay(grid, 3, [(2, 1), (3, 3)], "max", [1])
    assert short["methods_below_grid"] == "slow"
    assert short["per_method"]["slow"] == {"grid": 0.8, "asha": 0.55}
    assert short["best_method"] == "fast" and not short["same_best"]
    assert full["methods_below_grid"] == "-" and full["same_best"] and full["trial_epochs"] == 12
