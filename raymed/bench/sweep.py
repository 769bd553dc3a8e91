"""Suite `sweep`: ASHA vs the full grid on the default sweep — trial-epochs spent, and the best method.

`real` mode runs the sweep twice through `raymed.tune.sweep.run_sweep` (the recipe's own trials): once with its
ASHA scheduler, once with FIFO (every grid point trains all epochs). Trial-epochs = the sum over trials
of the epochs each one trained; the best trial is ranked as `raymed.tune.report` ranks it (metric at the
trial's last report, stopped trials included).

`replay` mode runs only the grid and replays ASHA on its recorded learning curves, with Ray's own
`AsyncHyperBandScheduler` deciding at each rung, trials advancing one epoch per time unit `concurrency` at a time
(equal epoch durations: an approximation of the real asynchronous order). One grid run then prices any
(reduction factor, grace period, max epochs) setting, which shows what a sweep needs for a given budget, and
what it costs the comparison: each method's best under the replayed ASHA against its best in the grid (a short
grace period stops methods that start slowly, e.g. few-parameter ones at the high learning rates they need).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from raymed.tables import table

from raymed.bench.common import header, ratio, result, target, targets_table

QUICK_SEARCH = {"method.name": ["full", "ln", "lora", "prefix"], "train.lr": [3.0e-2]}
QUICK_TRAIN = ["data.synth_n=60", "data.max_eval_rows=24"]


def load(config: str | None, overrides: list[str], quick: bool, epochs: int | None,
         methods: list[str] | None) -> tuple[Any, dict[str, Any]]:
    """The sweep and its base training dict, shrunk for `--quick` / `--epochs` / `--methods`."""
    from raymed.tune.sweep import check_sweep, load_sweep

    extra = [*QUICK_TRAIN] if quick else []
    if epochs:
        extra.append(f"train.epochs={epochs}")
    sweep, base = load_sweep(config, [*extra, *overrides])
    search = dict(sweep.search)
    if quick:
        search.update(QUICK_SEARCH)
    if methods:
        search["method.name"] = methods
    if search != sweep.search:
        sweep = sweep.model_copy(update={"search": search})
        check_sweep(sweep, base, "bench sweep")
    return sweep, base


def trials_of(results: Any, runs_dir: Path, metric: str) -> list[dict[str, Any]]:
    """Per trial: method, lr, epochs trained, optimizer steps, metric per epoch, final metric — from the rows the
    trials wrote (raymed.tune.results), as `raymed.tune.report` reads them; Tune's results only for trials with none."""
    from raymed.tune.results import read_result_rows

    out = []
    for row in read_result_rows(runs_dir) if runs_dir.is_dir() else []:
        curve = [float(h[metric]) for h in row["history"] if h.get(metric) is not None]
        out.append({
            "trial_id": row["trial_id"], "method": row["method"], "lr": row["lr"], "epochs": int(row["epochs"]),
            "steps": int(row["steps"] or 0), "curve": curve, "final": curve[-1] if curve else float("nan"),
            "stopped_early": bool(row["stopped_early"]), "wall_s": row.get("wall_s"),
        })
    reported = len(out)
    for res in results:
        if res.error is not None and reported <= len(out):
            out.append({"trial_id": res.path.rsplit("/", 1)[-1], "error": str(res.error)})
    return out


def best(trials: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Best trial by its last-reported metric (ties: every method tied at the top is listed)."""
    ok = [t for t in trials if "error" not in t and not math.isnan(t["final"])]
    if not ok:
        return {"method": None, "lr": None, "value": None, "tied_methods": []}
    sign = 1 if mode == "max" else -1
    top = max(sign * t["final"] for t in ok)
    tied = [t for t in ok if sign * t["final"] == top]
    return {"method": tied[0]["method"], "lr": tied[0]["lr"], "value": tied[0]["final"],
            "tied_methods": sorted({t["method"] for t in tied})}


def replay_asha(curves: dict[str, list[float]], max_t: int, grace: int, rf: float, mode: str,
                concurrency: int) -> dict[str, int]:
    """Epochs each trial would train under Ray's ASHA (`AsyncHyperBandScheduler`, one bracket, fed each trial's
    results through its public interface) given its learning curve."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    asha = AsyncHyperBandScheduler(time_attr="epoch", metric="m", mode=mode, max_t=max_t, grace_period=grace,
                                   reduction_factor=rf, brackets=1)
    pending, running, done = list(curves), {}, {}
    while pending or running:
        while pending and len(running) < concurrency:
            tid = pending.pop(0)
            running[tid] = 0
            asha.on_trial_add(None, SimpleNamespace(trial_id=tid))
        for tid in list(running):
            running[tid] += 1
            epoch = running[tid]
            value = curves[tid][epoch - 1]
            stop = asha.on_trial_result(None, SimpleNamespace(trial_id=tid), {"epoch": epoch, "m": value}) \
                == TrialScheduler.STOP
            if stop:
                done[tid] = epoch
                del running[tid]
    return done


def replay(grid: list[dict[str, Any]], max_t: int, settings: list[tuple], mode: str,
           concurrencies: list[int]) -> list[dict[str, Any]]:
    """ASHA replayed on the grid's curves for each (rf, grace[, "method"]) x concurrency: trial-epochs, best
    method, each method's best. A third element "method" replays `scheduler.per: method.name` (one bracket
    per method, each method's trials run as their own queue)."""
    ok = [t for t in grid if "error" not in t and len(t["curve"]) >= max_t]
    curves = {t["trial_id"]: t["curve"][:max_t] for t in ok}
    by_id = {t["trial_id"]: t for t in ok}
    finished = [{**t, "final": t["curve"][max_t - 1]} for t in ok]
    grid_best, grid_methods = best(finished, mode), method_bests(finished, mode)
    sign = 1 if mode == "max" else -1
    rows = []
    for rf, grace, *per in settings:
        groups = ([{tid: c for tid, c in curves.items() if by_id[tid]["method"] == m}
                   for m in dict.fromkeys(t["method"] for t in ok)] if per else [curves])
        for c in concurrencies:
            epochs = {tid: e for g in groups for tid, e in replay_asha(g, max_t, grace, rf, mode, c).items()}
            sim = [{**by_id[tid], "final": curves[tid][e - 1], "epochs": e} for tid, e in epochs.items()]
            b = best(sim, mode)
            spent = sum(epochs.values())
            found = method_bests(sim, mode)
            rows.append({"scheduler": f"ASHA replay rf={rf:g} grace={grace}{' per method' if per else ''} "
                                      f"max_t={max_t} conc={c}",
                         "trials": len(curves), "trial_epochs": spent, "grid_trial_epochs": max_t * len(curves),
                         "ratio": ratio(spent, max_t * len(curves)), "best_method": b["method"],
                         "best_value": b["value"], "same_best": b["method"] == grid_best["method"],
                         "per_method": {m: {"grid": g, "asha": found[m]} for m, g in grid_methods.items()},
                         "methods_below_grid": " ".join(m for m, g in grid_methods.items()
                                                        if sign * found[m] < sign * g) or "-"})
    return rows


def method_bests(trials: list[dict[str, Any]], mode: str) -> dict[str, float]:
    """Each method's best last-reported metric over its trials (what the report's per-method table shows)."""
    methods = dict.fromkeys(t["method"] for t in trials if "method" in t)
    found = {m: best([t for t in trials if t.get("method") == m], mode)["value"] for m in methods}
    return {m: v for m, v in found.items() if v is not None}


def run(config: str | None = None, overrides: tuple[str, ...] = (), quick: bool = False, mode: str = "real",
        epochs: int | None = None, methods: list[str] | None = None,
        replay_settings: tuple[tuple, ...] = ((2, 1), (3, 1), (4, 1), (3, 2), (3, 3), (3, 1, "method"),
                                               (3, 3, "method")),
        out: str | None = None, grid_from: str | None = None) -> dict[str, Any]:
    import ray

    from raymed.tune.sweep import mark_stopped, run_sweep

    started = time.time()
    sweep, base = load(config, list(overrides), quick, epochs, methods)
    from raymed.config import validate

    max_t = validate(base).train.epochs
    started_ray = not ray.is_initialized()
    runs: dict[str, dict[str, Any]] = {}
    tmp = None if out else tempfile.TemporaryDirectory(prefix="raymed-bench-sweep-")
    root = Path(out or tmp.name)
    if grid_from:  # replay only: the grid's learning curves from an earlier run of this suite
        runs["fifo"] = json.loads(Path(grid_from).read_text())["runs"]["fifo"]
    try:
        kinds = ("asha", "fifo") if mode == "real" else () if grid_from else ("fifo",)
        for kind in kinds:
            s = sweep.model_copy(update={"name": f"{sweep.name}-{kind}",
                                         "scheduler": sweep.scheduler.model_copy(update={"type": kind})})
            t0 = time.time()
            results = run_sweep(s, base, root)
            mark_stopped(results, str(root / s.name / "runs"), max_t)
            trials = trials_of(results, root / s.name / "runs", sweep.metric)
            runs[kind] = {"wall_s": time.time() - t0, "trials": trials,
                          "concurrency": s.max_concurrent or _concurrency(s, base)}
            print(f"[bench sweep] {kind}: {sum(t.get('epochs', 0) for t in trials)} trial-epochs over "
                  f"{len(trials)} trials in {runs[kind]['wall_s']:.0f} s", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    grid = runs["fifo"]["trials"]
    grid_spent = sum(t.get("epochs", 0) for t in grid)
    grid_best = best(grid, sweep.mode)
    rows = [_row("grid (FIFO)", grid, grid_spent, grid_spent, grid_best, grid_best, runs["fifo"]["wall_s"])]
    targets = []
    if "asha" in runs:
        asha = runs["asha"]["trials"]
        spent = sum(t.get("epochs", 0) for t in asha)
        asha_best = best(asha, sweep.mode)
        rows.append(_row(f"ASHA rf={sweep.scheduler.reduction_factor:g} grace={sweep.scheduler.grace_period}", asha,
                         spent, grid_spent, asha_best, grid_best, runs["asha"]["wall_s"]))
        targets = [target("ASHA / grid trial-epochs", rows[-1]["ratio"], 0.35, "<=", f"max_t={max_t}"),
                   {"name": "same best method as the grid", "value": rows[-1]["same_best"], "target": "== True",
                    "met": bool(rows[-1]["same_best"]),
                    "note": f"grid {grid_best['method']} (tied {grid_best['tied_methods']}), ASHA {asha_best['method']}"}]
    conc = runs["fifo"]["concurrency"]
    replayed = replay(grid, max_t, list(replay_settings), sweep.mode, sorted({conc, 1, len(grid)}))
    config_doc = {"sweep": sweep.name, "config": config or "raymed/defaults/sweep.yaml", "overrides": list(overrides),
                  "quick": quick, "mode": mode, "search": sweep.search, "metric": sweep.metric, "max_t": max_t,
                  "scheduler": sweep.scheduler.model_dump(), "concurrency": conc, "load_1min_end": os.getloadavg()[0]}
    return result("sweep", config_doc, rows, targets, started, replay=replayed,
                  runs={k: {**v, "trials": v["trials"]} for k, v in runs.items()})


def _concurrency(sweep: Any, base: dict[str, Any]) -> int:
    import ray

    from raymed.config import validate
    from raymed.tune.sweep import trial_cpus

    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count() or 1
    return max(1, int(cpus // trial_cpus(validate(base), sweep)))


def _row(name: str, trials: list[dict[str, Any]], spent: int, grid_spent: int, b: dict[str, Any],
         grid_best: dict[str, Any], wall_s: float) -> dict[str, Any]:
    return {"scheduler": name, "trials": len(trials), "errored": sum("error" in t for t in trials),
            "stopped_early": sum(bool(t.get("stopped_early")) for t in trials), "trial_epochs": spent,
            "grid_trial_epochs": grid_spent, "ratio": ratio(spent, grid_spent),
            "trial_steps": sum(t.get("steps", 0) for t in trials), "best_method": b["method"], "best_lr": b["lr"],
            "best_value": b["value"], "tied_methods": b["tied_methods"], "same_best": b["method"] == grid_best["method"],
            "wall_s": wall_s}


COLUMNS = [("scheduler", "scheduler"), ("trials", "trials"), ("stopped_early", "stopped"),
           ("trial_epochs", "trial-epochs"), ("ratio", "x grid"), ("best_method", "best method"),
           ("best_value", "best metric"), ("same_best", "same best"), ("wall_s", "wall s")]


def render(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return "\n".join(x for x in [
        header(doc),
        f"sweep {c['sweep']} ({c['config']}{', quick' if c['quick'] else ''}): search {c['search']}, "
        f"metric {c['metric']}, {c['max_t']} epochs, {c['concurrency']} trials at a time",
        table(doc["rows"], COLUMNS),
        "ASHA replayed on the grid's learning curves (equal epoch times):",
        table(doc["replay"], [*COLUMNS[:-1], ("methods_below_grid", "methods below their grid best")]),
        targets_table(doc["targets"]),
    ] if x)


def add_arguments(ap: Any) -> None:
    ap.add_argument("--config", default=None, help="sweep YAML (default: the built-in default sweep)")
    ap.add_argument("--quick", action="store_true",
                    help=f"4 methods x 1 lr on a smaller synthetic set ({QUICK_SEARCH}, {QUICK_TRAIN})")
    ap.add_argument("--mode", choices=("real", "replay"), default="real",
                    help="real: ASHA and grid sweeps; replay: grid only, ASHA replayed on its curves")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs of every trial (ASHA's max_t)")
    ap.add_argument("--methods", default=None, help="space-separated methods (replaces the search's method.name)")
    ap.add_argument("--replay", default="2:1 3:1 4:1 3:2 3:3 3:1:method 3:3:method",
                    help="replayed ASHA settings RF:GRACE[:method] (:method = one bracket per method; "
                         "default: %(default)s)")
    ap.add_argument("--grid-from", default=None,
                    help="replay mode: take the grid's curves from this suite's earlier JSON instead of running it")
    ap.add_argument("--keep", default=None, help="experiment folder to keep (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as for python -m raymed.tune")


def from_args(args: Any) -> dict[str, Any]:
    parts = [s.split(":") for s in args.replay.split()]
    if any(len(p) not in (2, 3) or p[2:] not in ([], ["method"]) for p in parts):
        raise SystemExit(f"--replay: RF:GRACE or RF:GRACE:method, got {args.replay!r}")
    settings = tuple((float(p[0]), int(p[1]), *p[2:]) for p in parts)
    if args.grid_from and args.mode != "replay":
        raise SystemExit("--grid-from needs --mode replay")
    return run(config=args.config, overrides=tuple(args.overrides), quick=args.quick, mode=args.mode,
               epochs=args.epochs, methods=args.methods.split() if args.methods else None,
               replay_settings=settings, out=args.keep, grid_from=args.grid_from)
