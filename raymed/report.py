"""Sweep comparison report: ``results.json``, ``results.csv``, ``report.md`` and ``frontier.png``.

Built from one row per trial; ``python -m raymed.report EXPERIMENT_DIR`` rebuilds it from the rows that training
writes into every checkpoint (:mod:`raymed.results`; or from an earlier ``results.json``), the very rows the sweep
built it from: the rebuilt ``results.json`` equals the sweep's. ``curves.png`` plots each method's best trial's
metric and loss per epoch.

Row format (one JSON object per run; :func:`raymed.results.result_row` writes it)::

    trial_id       str, required        unique per trial
    method         str, required        "ln", "lora", "full", ...
    metrics        dict, required       flat {name: number}; "eval/<set>/<name>" after training
                                        (e.g. "eval/test/closed_acc", "eval/ood/open_recall"),
                                        "zeroshot/<set>/<name>" before it; other keys are kept too
    model          str | None           base model (preset or path); labels carry it when trials differ
    towers         list[str] | None     towers the method was applied to (None: the method's default)
    lr             float | None
    params         {"trainable": int, "total": int, "percent": float}   percent in 0..100
    steps          int | None           optimizer steps taken
    wall_s         float | None         wall-clock seconds
    peak_mem_mb    float | None         peak accelerator (or host) memory
    stopped_early  bool                 stopped by the scheduler (ASHA) before its last epoch
    config_hash    str | None
    machine        str | dict | None    optional: where the trial ran

Other keys (``config``, ...) are carried through to ``results.json`` untouched. Metric values are
rounded to 4 significant digits (4 decimals from 1 up) when the report is built; ``report.md`` prints
exactly the numbers stored in ``results.json``.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import logging
import math
import re
import posixpath
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import machine, storage

logger = logging.getLogger(__name__)

DEFAULT_METRIC = "eval/test/overall_acc"
RESULTS_FILE = "results.json"  # the report's own summary
REQUIRED_KEYS = ("trial_id", "method", "metrics")
_METRIC_RE = re.compile(r"^(?P<kind>[^/]+)/(?P<set>[^/]+)/(?P<name>.+)$")


# ----------------------------------------------------------------------------------------- rows
def normalize_row(row: Mapping[str, Any], where: str = "row") -> dict[str, Any]:
    """Validate one trial row and return a copy with defaults filled and numbers rounded.

    Raises ``ValueError`` listing every problem of the row, each naming ``where`` and the key.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    errors = [f"{where}: missing key {key!r}" for key in REQUIRED_KEYS if key not in row]
    out = dict(row)
    out["trial_id"] = str(row.get("trial_id", ""))
    out["method"] = str(row.get("method", ""))
    towers = row.get("towers")
    out["towers"] = [towers] if isinstance(towers, str) else (list(towers) if towers else None)
    out["lr"] = _number(row.get("lr"), f"{where}: 'lr'", errors)
    out["params"] = _params(row.get("params"), where, errors)
    metrics = row.get("metrics", {})
    if not isinstance(metrics, Mapping):
        errors.append(f"{where}: 'metrics' must be an object of name -> number, got {metrics!r}")
        metrics = {}
    out["metrics"] = {
        str(k): _round(_number(v, f"{where}: metric {k!r}", errors)) for k, v in sorted(metrics.items())
    }
    steps = _number(row.get("steps"), f"{where}: 'steps'", errors)
    out["steps"] = int(steps) if steps is not None else None
    for key in ("wall_s", "peak_mem_mb"):
        value = _number(row.get(key), f"{where}: {key!r}", errors)
        out[key] = round(value, 1) if value is not None else None
    stopped = row.get("stopped_early", False)
    if not isinstance(stopped, bool):
        errors.append(f"{where}: 'stopped_early' must be true or false, got {stopped!r}")
    out["stopped_early"] = bool(stopped)
    out["config_hash"] = None if row.get("config_hash") is None else str(row["config_hash"])
    if errors:
        raise ValueError("\n".join(errors))
    return out


def _number(value: Any, what: str, errors: list[str]) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        errors.append(f"{what} must be a number, got {value!r}")
        return None
    if isinstance(value, float) and not math.isfinite(value):
        logger.warning("%s is %s; reported as missing", what, value)
        return None
    return value


def _round(value: float | int | None) -> float | int | None:
    if value is None or isinstance(value, int):
        return value
    return float(f"{value:.4g}") if abs(value) < 1 else round(value, 4)


def _params(value: Any, where: str, errors: list[str]) -> dict[str, Any]:
    value = value if isinstance(value, Mapping) else {}
    trainable = _number(value.get("trainable"), f"{where}: 'params.trainable'", errors)
    total = _number(value.get("total"), f"{where}: 'params.total'", errors)
    percent = _number(value.get("percent"), f"{where}: 'params.percent'", errors)
    if percent is None and trainable is not None and total:
        percent = 100.0 * trainable / total
    return {
        "trainable": int(trainable) if trainable is not None else None,
        "total": int(total) if total is not None else None,
        "percent": _round(float(percent)) if percent is not None else None,
    }


def load_rows(experiment_dir: str | Path) -> list[dict[str, Any]]:
    """The trial rows of an experiment: every run's latest checkpoint row below it (:mod:`raymed.results`),
    or else the ``results.json`` of an earlier report."""
    from .results import read_rows

    root = storage.resolve(experiment_dir)
    rows = read_rows(root) if storage.is_dir(root) else []
    if rows:
        return [normalize_row(r, f"{root} run {r.get('trial_id')}") for r in rows]
    summary = storage.join(root, RESULTS_FILE)
    if storage.is_file(summary):
        data = storage.read_json(summary)
        trials = data.get("trials") if isinstance(data, Mapping) else data
        if not isinstance(trials, list):
            raise ValueError(f"{summary}: expected a list of trials or an object with 'trials'")
        return [normalize_row(t, f"{summary} trial {i}") for i, t in enumerate(trials)]
    raise FileNotFoundError(
        f"no trial results under {root}: expected run folders with epoch-NNNN/row.json checkpoints "
        f"or a {RESULTS_FILE}"
    )


# --------------------------------------------------------------------------------------- report
def build_report(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    metric: str = DEFAULT_METRIC,
    mode: str = "max",
) -> dict[str, Path | str]:
    """Write results.json, results.csv, report.md and frontier.png into ``out_dir`` (a folder or URI);
    return their paths.

    Trials are ranked by ``metric`` (``mode`` "max" or "min"); the best trial of each method (and tower
    choice, when a method was run with several) is its representative in the summary and the plot.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    trials = [normalize_row(r, f"row {i}") for i, r in enumerate(rows)]
    if not trials:
        raise ValueError("no trial results to report")
    duplicates = sorted(k for k, n in Counter(t["trial_id"] for t in trials).items() if n > 1)
    if duplicates:
        raise ValueError(f"trial ids must be unique; repeated: {', '.join(duplicates)}")
    available = sorted({k for t in trials for k, v in t["metrics"].items() if v is not None})
    if metric not in available:
        close = difflib.get_close_matches(metric, available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"metric {metric!r} is reported by no trial.{hint} "
            f"Available metrics: {', '.join(available) or 'none'}"
        )

    sign = 1.0 if mode == "max" else -1.0
    ranked = sorted(trials, key=lambda t: _sort_key(t, metric, sign))
    for i, t in enumerate(ranked):
        t["rank"] = i + 1 if t["metrics"].get(metric) is not None else None
    labels = _labels(ranked)
    best: dict[str, dict[str, Any]] = {}
    for t in ranked:  # ranked order: the first row of each label is its best
        best.setdefault(labels[t["trial_id"]], t)
    columns = _metric_columns(available, metric)

    flat = [_flat(t, labels[t["trial_id"]], columns) for t in ranked]
    best_flat = [_flat(t, label, columns) for label, t in best.items()]
    machines = sorted({json.dumps(t["machine"], sort_keys=True) for t in ranked if t.get("machine")})

    with storage.staged_output(out_dir) as out:
        files = _write_report(out, ranked, flat, best, best_flat, columns, metric, mode, machines,
                              posixpath.basename(storage.resolve(out_dir)))
    if not storage.is_uri(out_dir):
        return files
    return {k: storage.join(storage.resolve(out_dir), p.name) for k, p in files.items()}


def _write_report(out: Path, ranked: list, flat: list, best: dict, best_flat: list, columns: list, metric: str,
                  mode: str, machines: list, name: str) -> dict[str, Path]:
    host = machine.summary(machine.describe())
    files = {
        "results_json": out / RESULTS_FILE,
        "results_csv": out / "results.csv",
        "report_md": out / "report.md",
        "frontier_png": out / "frontier.png",
        "curves_png": out / "curves.png",
    }
    # Only what the rows determine: rebuilding the report from the same folder gives the same file.
    summary = {
        "metric": metric,
        "mode": mode,
        "metric_columns": columns,
        "best_per_method": {label: t["trial_id"] for label, t in best.items()},
        "trials": ranked,
    }
    files["results_json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _write_csv(files["results_csv"], flat)
    files["report_md"].write_text(_markdown(flat, best_flat, columns, metric, mode, host, machines, name))
    _plot_frontier(files["frontier_png"], best, metric, mode)
    _plot_curves(files["curves_png"], best, metric)
    return files


def _sort_key(t: Mapping[str, Any], metric: str, sign: float) -> tuple[bool, float, str]:
    value = t["metrics"].get(metric)
    return (value is None, -sign * value if value is not None else 0.0, t["trial_id"])


def _towers(t: Mapping[str, Any]) -> str:
    return "+".join(t["towers"]) if t["towers"] else "default"


def _labels(trials: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Label per trial: the method, plus its towers when the method ran with several tower choices, prefixed
    by the base model when the sweep compared several models."""
    choices: dict[str, set[str]] = {}
    for t in trials:
        choices.setdefault(t["method"], set()).add(_towers(t))
    several_models = len({t.get("model") for t in trials}) > 1
    labels = {}
    for t in trials:
        label = t["method"] if len(choices[t["method"]]) == 1 else f"{t['method']} [{_towers(t)}]"
        labels[t["trial_id"]] = f"{t.get('model')} · {label}" if several_models else label
    return labels


def _metric_columns(available: Sequence[str], metric: str) -> list[str]:
    """Every metric, ordered: the ranking metric, its eval set, other eval sets, zero-shot, the rest."""
    main = _METRIC_RE.match(metric)

    def key(name: str) -> tuple[int, str]:
        m = _METRIC_RE.match(name)
        if name == metric:
            return (0, name)
        if m and main and m["kind"] == main["kind"] and m["set"] == main["set"]:
            return (1, name)
        if m and m["kind"] == "eval":
            return (2, name)
        if m and m["kind"] == "zeroshot":
            return (3, name)
        return (4, name)

    return sorted(available, key=key)


def _ood_columns(columns: Sequence[str], metric: str) -> list[str]:
    """Zero-shot and other-eval-set columns for the ranking metric's name (all of a set's metrics when
    that set lacks the name)."""
    main = _METRIC_RE.match(metric)
    if not main:
        return []
    by_set: dict[tuple[str, str], list[str]] = {}
    for name in columns:
        m = _METRIC_RE.match(name)
        if m and m["kind"] in ("eval", "zeroshot") and (m["kind"], m["set"]) != (main["kind"], main["set"]):
            by_set.setdefault((m["kind"], m["set"]), []).append(name)
    out: list[str] = []
    for (kind, eval_set), names in sorted(by_set.items(), key=lambda kv: (kv[0][0] != "eval", kv[0][1])):
        same = f"{kind}/{eval_set}/{main['name']}"
        out.extend([same] if same in names else names)
    zeroshot_main = f"zeroshot/{main['set']}/{main['name']}"
    if zeroshot_main in columns and zeroshot_main not in out:
        out.append(zeroshot_main)
    return out


# ------------------------------------------------------------------------------------- writers
def _flat(t: Mapping[str, Any], label: str, columns: Sequence[str]) -> dict[str, Any]:
    """One trial as the columns of results.csv and report.md (same names in both)."""
    p = t["params"]
    return {
        "rank": t["rank"], "trial_id": t["trial_id"], "method": label, "towers": _towers(t), "lr": t["lr"],
        "trainable_params": p["trainable"], "total_params": p["total"], "trainable_pct": p["percent"],
        **{c: t["metrics"].get(c) for c in columns},
        "steps": t["steps"], "wall_s": t["wall_s"], "peak_mem_mb": t["peak_mem_mb"],
        "stopped_early": t["stopped_early"], "config_hash": t["config_hash"],
    }


def _cell(value: Any) -> str:
    """A value in report.md: str() of the number stored in results.json, '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("|", "\\|")


def _table(flat: Sequence[Mapping[str, Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in header) + " |" for row in flat]
    return "\n".join(lines)


def _write_csv(path: Path, flat: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in flat)


def _markdown(
    flat: Sequence[Mapping[str, Any]],
    best: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    metric: str,
    mode: str,
    host: str,
    machines: Sequence[str],
    name: str,
) -> str:
    main = _METRIC_RE.match(metric)
    prefix = f"{main['kind']}/{main['set']}/" if main else metric
    main_cols = [c for c in columns if c == metric or c.startswith(prefix)]
    tail = ["steps", "wall_s", "peak_mem_mb", "stopped_early"]
    parts = [
        f"# Sweep report: {name}",
        "",
        f"Ranked by `{metric}` ({'higher' if mode == 'max' else 'lower'} is better): {len(flat)} trials, "
        f"{len(best)} methods, {sum(r['stopped_early'] for r in flat)} stopped early. "
        "Every number here is the one stored in `results.json`.",
        "",
        "## Best configuration per method",
        "",
        _table(best, ["rank", "method", "towers", "lr", "trainable_params", "trainable_pct", *main_cols,
                      *tail, "trial_id"]),
        "",
        "![metric vs trainable parameters](frontier.png)",
        "",
        "![learning curves of each method's best trial](curves.png)",
        "",
    ]
    ood = _ood_columns(columns, metric)
    if ood:
        parts += [
            "## Out-of-distribution and zero-shot",
            "",
            f"The best configuration of each method (chosen on `{metric}`) on the other evaluation sets.",
            "",
            _table(best, ["method", "lr", metric, *ood]),
            "",
        ]
    parts += [
        "## All trials",
        "",
        _table(flat, ["rank", "trial_id", "method", "towers", "lr", "trainable_params", "total_params",
                      "trainable_pct", *columns, *tail]),
        "",
        "## Machine",
        "",
        *(f"- trials ran on: {m}" for m in machines),
        f"- report built on: {host}",
        f"- built: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
    ]
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------- frontier
def pareto_front(points: Sequence[tuple[float, float]], mode: str = "max") -> list[int]:
    """Indices of the points (trainable params, metric) that no other point dominates, by params.

    A point is dominated when another has no more parameters and an equal-or-better metric, and is
    strictly better in one of the two.
    """
    sign = 1.0 if mode == "max" else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def _plot_frontier(path: Path, best: Mapping[str, Mapping[str, Any]], metric: str, mode: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, points = [], []
    for label, t in best.items():
        value, trainable = t["metrics"].get(metric), t["params"]["trainable"]
        if value is None or not trainable:  # no metric, or nothing trained: no place on a log axis
            logger.info("frontier: %s left out (metric %s, trainable %s)", label, value, trainable)
            continue
        names.append(f"{label} (lr {t['lr']})" if t["lr"] is not None else label)
        points.append((float(trainable), float(value)))

    fig = Figure(figsize=(7.5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        front = pareto_front(points, mode)
        xs, ys = zip(*points)
        ax.scatter(xs, ys, color="tab:blue", zorder=3, label="best lr per method")
        fx, fy = zip(*(points[i] for i in front))
        ax.plot(fx, fy, color="tab:red", drawstyle="steps-post", zorder=2)
        ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="tab:red", zorder=4, label="Pareto front")
        # Alternate labels above and below, in x order, so that neighbouring labels do not overlap.
        for k, i in enumerate(sorted(range(len(points)), key=lambda i: points[i])):
            dy, va = (6, "bottom") if k % 2 == 0 else (-6, "top")
            ax.annotate(names[i], points[i], textcoords="offset points", xytext=(5, dy), va=va, fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.12, y=0.1)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trial reports both the metric\nand its trainable parameters",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.set_title(f"{metric} vs trainable parameters (one point per method at its best lr)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _plot_curves(path: Path, best: Mapping[str, Mapping[str, Any]], metric: str) -> None:
    """Per method (its best trial): the ranking metric and the training loss per epoch (epoch 0: zero-shot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax_metric, ax_loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    zero_shot_key = metric.replace("eval/", "zeroshot/", 1)
    for label, t in best.items():
        history = t.get("history") or []
        points = [(h["epoch"], h[metric]) for h in history if h.get(metric) is not None]
        if points and t["metrics"].get(zero_shot_key) is not None:
            points.insert(0, (0, t["metrics"][zero_shot_key]))
        if points:
            ax_metric.plot(*zip(*points), marker="o", ms=3, label=label)
        losses = [(h["epoch"], h["loss"]) for h in history if h.get("loss") is not None]
        if losses:
            ax_loss.plot(*zip(*losses), marker="o", ms=3, label=label)
    ax_metric.set(xlabel="epoch (0 = zero-shot)", ylabel=metric, title=f"{metric} per epoch (best trial per method)")
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="training loss per epoch")
    for ax in (ax_metric, ax_loss):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


# ------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m raymed.report EXPERIMENT_DIR [--metric M] [--mode max|min] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m raymed.report", description="Rebuild the sweep report of an experiment folder."
    )
    parser.add_argument("experiment_dir", help="experiment folder or URI (s3://, gs://)")
    parser.add_argument(
        "--metric", help=f"metric to rank by (default: the previous report's, else {DEFAULT_METRIC})"
    )
    parser.add_argument(
        "--mode", choices=("max", "min"), help="max or min (default: the previous report's, else max)"
    )
    parser.add_argument("--out", help="output folder or URI (default: EXPERIMENT_DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    previous = _previous_settings(args.experiment_dir)
    metric = args.metric or previous.get("metric") or DEFAULT_METRIC
    mode = args.mode or previous.get("mode") or "max"
    try:
        rows = load_rows(args.experiment_dir)
        files = build_report(rows, args.out or args.experiment_dir, metric=metric, mode=mode)
    except (ValueError, FileNotFoundError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = storage.read_json(files["results_json"])
    print(f"{len(rows)} trials ranked by {metric} ({mode}); best per method:")
    for label, trial_id in summary["best_per_method"].items():
        t = next(t for t in summary["trials"] if t["trial_id"] == trial_id)
        print(f"  {label:<24} lr {_cell(t['lr']):<8} {metric} {_cell(t['metrics'].get(metric))}")
    for path in files.values():
        print(f"wrote {path}")
    return 0


def _previous_settings(experiment_dir: str) -> dict[str, Any]:
    try:
        data = storage.read_json(storage.join(experiment_dir, RESULTS_FILE))
    except (OSError, json.JSONDecodeError, storage.StorageError):
        return {}
    return {k: data.get(k) for k in ("metric", "mode")} if isinstance(data, dict) else {}


if __name__ == "__main__":
    sys.exit(main())
