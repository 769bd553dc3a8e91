"""Sweep comparison report: ``results.json``, ``results.csv``, ``report.md``, ``frontier.png`` and ``curves.png``.

Built from one row per trial; ``python -m raymed.tune.report EXPERIMENT_DIR`` rebuilds it from the rows that training
writes into every checkpoint (:mod:`raymed.tune.results`; or from an earlier ``results.json``), the very rows the sweep
built it from: the rebuilt ``results.json`` equals the sweep's.

Each method's trial is chosen on the selection metric (``eval/val/...``) and reported on the eval split
(``test``), which nothing is chosen on (:mod:`raymed.tune.compare`); errored trials are never chosen. Every accuracy
carries its 95% exact binomial interval and each chosen trial an exact McNemar test against its zero-shot answers
and the chosen `ln` trial (:mod:`raymed.tune.stats`). ``frontier.png`` plots the chosen trials' reported metric against
their trainable parameters, ``curves.png`` their selection metric and loss per epoch.

Row format (one JSON object per run; :func:`raymed.tune.results.result_row` writes it)::

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
    error          str | None           set when the run failed (status ``errored``)
    answers        dict | None          per eval set, which questions were answered right:
                                        {"eval/test": {"ids": hash, "correct": "0110..."}, "zeroshot/test": ...}
    config_hash    str | None
    machine        str | dict | None    optional: where the trial ran

Other keys (``config``, ...) are carried through to ``results.json`` untouched, except the per-epoch ``answers``
of ``history`` (the row's own are those of its reported epoch). The report adds ``status`` (completed, stopped,
errored), ``intervals`` ({accuracy: [low, high]}) and ``rank``. Metric values, interval bounds and p-values are
rounded to 4 significant digits (4 decimals from 1 up) when the report is built; ``report.md`` prints exactly the
numbers stored in ``results.json``.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import logging
import math
import posixpath
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raymed import machine, storage
from raymed.tune import compare
from raymed.tune.compare import METRIC_RE
from raymed.tune.plots import plot_curves, plot_frontier
from raymed.tune.stats import LEVEL, accuracy_intervals

logger = logging.getLogger(__name__)

DEFAULT_METRIC = "eval/val/overall_acc"
LEGACY_METRIC = "eval/test/overall_acc"  # sweeps from before validation splits: nothing else to rank on
RESULTS_FILE = "results.json"  # the report's own summary
REQUIRED_KEYS = ("trial_id", "method", "metrics")


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
    numbers = {str(k): _number(v, f"{where}: metric {k!r}", errors) for k, v in sorted(metrics.items())}
    out["metrics"] = {k: _round(v) for k, v in numbers.items()}
    # from the unrounded values (a report rebuilt from results.json keeps the intervals it stored)
    intervals = row.get("intervals")
    intervals = intervals if isinstance(intervals, Mapping) else accuracy_intervals(numbers)
    out["intervals"] = {k: [_round(lo), _round(hi)] for k, (lo, hi) in sorted(intervals.items())}
    out["answers"] = _answers(row.get("answers"), where, errors)
    if isinstance(row.get("history"), list):
        out["history"] = [{k: v for k, v in h.items() if k != "answers"} if isinstance(h, Mapping) else h
                          for h in row["history"]]
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
    out["status"] = compare.status(out)
    if errors:
        raise ValueError("\n".join(errors))
    return out


def _answers(value: Any, where: str, errors: list[str]) -> dict[str, Any]:
    """The row's per-question correctness (:func:`raymed.tune.results.answers`), checked."""
    if value is None:
        return {}
    good = isinstance(value, Mapping) and all(
        isinstance(a, Mapping) and isinstance(a.get("ids"), str) and isinstance(a.get("correct"), str)
        and set(a["correct"]) <= {"0", "1"} for a in value.values())
    if not good:
        errors.append(f"{where}: 'answers' must map eval sets to {{'ids': str, 'correct': '0110...'}}, got "
                      f"{str(value)[:200]}")
        return {}
    return {str(k): dict(v) for k, v in sorted(value.items())}


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


def read_experiment_rows(experiment_dir: str | Path) -> list[dict[str, Any]]:
    """The trial rows of an experiment: every run's latest checkpoint row below it (:mod:`raymed.tune.results`),
    or else the ``results.json`` of an earlier report."""
    from raymed.tune.results import read_result_rows

    root = storage.resolve(experiment_dir)
    rows = read_result_rows(root) if storage.is_dir(root) else []
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
def default_metric(trials: Sequence[Mapping[str, Any]]) -> str:
    """The metric to choose on when none is given: the validation accuracy, or the test accuracy for sweeps run
    before validation splits existed (the report then says it chose on test)."""
    if not any(LEGACY_METRIC in t["metrics"] for t in trials) or any(DEFAULT_METRIC in t["metrics"] for t in trials):
        return DEFAULT_METRIC
    return LEGACY_METRIC


def build_report(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    metric: str | None = None,
    mode: str = "max",
) -> dict[str, Path | str]:
    """Write results.json, results.csv, report.md, frontier.png and curves.png into ``out_dir`` (a folder or URI);
    return their paths.

    Trials are ranked by ``metric`` (``mode`` "max" or "min"; default :func:`default_metric`), the selection
    metric; the best trial of each method (and tower choice, when a method was run with several) that did not error
    is its representative, reported on the trials' eval split with intervals and paired tests.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    trials = [normalize_row(r, f"row {i}") for i, r in enumerate(rows)]
    if not trials:
        raise ValueError("no trial results to report")
    duplicates = sorted(k for k, n in Counter(t["trial_id"] for t in trials).items() if n > 1)
    if duplicates:
        raise ValueError(f"trial ids must be unique; repeated: {', '.join(duplicates)}")
    metric = metric or default_metric(trials)
    available = sorted({k for t in trials for k, v in t["metrics"].items() if v is not None})
    if metric not in available:
        close = difflib.get_close_matches(metric, available, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"metric {metric!r} is reported by no trial.{hint} "
            f"Available metrics: {', '.join(available) or 'none'}"
        )
    split = compare.reported_split(trials)
    reported = compare.reported_metric(metric, split)
    ranked = compare.rank(trials, metric, mode)
    names = compare.labels(ranked)
    best = compare.chosen(ranked, names)
    tests = {label: {k: _rounded_test(v) for k, v in c.items()}
             for label, c in compare.comparisons(best, ranked, split).items()}
    selection = METRIC_RE.match(metric)
    summary = {  # only what the rows determine: rebuilding the report from the same folder gives the same file
        "metric": metric,
        "mode": mode,
        "selection_split": selection["set"] if selection and selection["kind"] == "eval" else None,
        "reported_split": split,
        "reported_metric": reported if reported in available else None,
        "interval": f"{LEVEL:.0%} exact binomial (Clopper-Pearson)",
        "paired_test": f"exact McNemar on eval/{split} answers (strict exact match), vs zero-shot and vs "
                       f"{compare.REFERENCE_METHOD}",
        "metric_columns": _metric_columns(available, metric, reported),
        "best_per_method": {label: t["trial_id"] for label, t in best.items()},
        "comparisons": tests,
        "trials": ranked,
    }
    errored_only = sorted({names[t["trial_id"]] for t in ranked} - set(best))
    with storage.staged_output(out_dir) as out:
        files = _write_report(out, summary, names, errored_only, posixpath.basename(storage.resolve(out_dir)))
    if not storage.is_uri(out_dir):
        return files
    return {k: storage.join(storage.resolve(out_dir), p.name) for k, p in files.items()}


def _rounded_test(value: Any) -> Any:
    return {k: _round(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _write_report(out: Path, summary: dict[str, Any], names: Mapping[str, str], errored_only: Sequence[str],
                  name: str) -> dict[str, Path]:
    files = {
        "results_json": out / RESULTS_FILE,
        "results_csv": out / "results.csv",
        "report_md": out / "report.md",
        "frontier_png": out / "frontier.png",
        "curves_png": out / "curves.png",
    }
    trials = {t["trial_id"]: t for t in summary["trials"]}
    best = {label: trials[i] for label, i in summary["best_per_method"].items()}
    files["results_json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    flat = [_flat(t, names[t["trial_id"]], summary["metric_columns"]) for t in summary["trials"]]
    _write_csv(files["results_csv"], flat)
    files["report_md"].write_text(_markdown(summary, flat, names, errored_only, name))
    plot_frontier(files["frontier_png"], best, summary["reported_metric"] or summary["metric"], summary["mode"])
    plot_curves(files["curves_png"], best, summary["metric"])
    return files


def _metric_columns(available: Sequence[str], metric: str, reported: str) -> list[str]:
    """Every metric, ordered: the selection metric, the reported metric and the rest of its eval set, the rest of
    the selection set, other eval sets, zero-shot, the rest."""
    sets = [m["kind"] + "/" + m["set"] if (m := METRIC_RE.match(x)) else x for x in (reported, metric)]

    def key(name: str) -> tuple[int, str]:
        m = METRIC_RE.match(name)
        where = f"{m['kind']}/{m['set']}" if m else None
        order = [name == metric, name == reported, where == sets[0], where == sets[1],
                 bool(m) and m["kind"] == "eval", bool(m) and m["kind"] == "zeroshot", True]
        return (order.index(True), name)

    return sorted(available, key=key)


def _ood_columns(columns: Sequence[str], metric: str, reported: str) -> list[str]:
    """Zero-shot and other-eval-set columns for the reported metric's name (all of a set's metrics when that set
    lacks the name); the selection split left out (it has its own column, and chooses rather than reports)."""
    main, selection = METRIC_RE.match(reported), METRIC_RE.match(metric)
    if not main:
        return []
    skip = {(main["kind"], main["set"]), *([(k, selection["set"]) for k in ("eval", "zeroshot")] if selection else [])}
    by_set: dict[tuple[str, str], list[str]] = {}
    for name in columns:
        m = METRIC_RE.match(name)
        if m and m["kind"] in ("eval", "zeroshot") and (m["kind"], m["set"]) not in skip:
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
    """One trial as the columns of results.csv and report.md (same names in both); an accuracy's interval bounds
    in ``<metric>_ci_low`` / ``<metric>_ci_high``."""
    p = t["params"]
    metrics: dict[str, Any] = {}
    for c in columns:
        metrics[c] = t["metrics"].get(c)
        if c in t["intervals"]:
            metrics[f"{c}_ci_low"], metrics[f"{c}_ci_high"] = t["intervals"][c]
    return {
        "rank": t["rank"], "trial_id": t["trial_id"], "method": label, "towers": compare.towers(t), "lr": t["lr"],
        "trainable_params": p["trainable"], "total_params": p["total"], "trainable_pct": p["percent"],
        **metrics,
        "steps": t["steps"], "wall_s": t["wall_s"], "peak_mem_mb": t["peak_mem_mb"], "status": t["status"],
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
    """A markdown table; an accuracy's cell holds its interval too: ``0.61 [0.52, 0.7]``."""
    def cell(row: Mapping[str, Any], c: str) -> str:
        low, high = row.get(f"{c}_ci_low"), row.get(f"{c}_ci_high")
        return _cell(row[c]) + (f" [{_cell(low)}, {_cell(high)}]" if low is not None and row[c] is not None else "")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row, c) for c in header) + " |" for row in flat]
    return "\n".join(lines)


def _write_csv(path: Path, flat: Sequence[Mapping[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for row in flat for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in fields} for row in flat)


def _paired_rows(summary: Mapping[str, Any], best_flat: Sequence[Mapping[str, Any]]) -> tuple[list, list[str]]:
    """The paired-comparison table: each chosen trial's reported accuracy and zero-shot accuracy, and the McNemar
    tests against zero-shot and against the chosen `ln` trial."""
    split, ref = summary["reported_split"], compare.REFERENCE_METHOD
    acc, zs = f"eval/{split}/overall_acc", f"zeroshot/{split}/overall_acc"
    rows = []
    for r in best_flat:
        tests = summary["comparisons"][r["method"]]
        row = {"method": r["method"], "lr": r["lr"], acc: r.get(acc), zs: r.get(zs), "trial_id": r["trial_id"],
               **{f"{acc}_ci_{e}": r.get(f"{acc}_ci_{e}") for e in ("low", "high")},
               **{f"{zs}_ci_{e}": r.get(f"{zs}_ci_{e}") for e in ("low", "high")}}
        for against in ("zero-shot", ref):
            test = tests[against] or {}
            row.update({f"{k} vs {against}": test.get(k) for k in ("gained", "lost", "p")})
        row[f"{ref} trial"] = tests[f"{ref}_trial"]
        rows.append(row)
    header = ["method", "lr", acc, zs, *(f"{k} vs {a}" for a in ("zero-shot", ref) for k in ("gained", "lost", "p")),
              f"{ref} trial", "trial_id"]
    return rows, header


def _headline(summary: Mapping[str, Any], flat: Sequence[Mapping[str, Any]], errored_only: Sequence[str]) -> list[str]:
    metric, split, selection = summary["metric"], summary["reported_split"], summary["selection_split"]
    better = "higher" if summary["mode"] == "max" else "lower"
    count = Counter(r["status"] for r in flat)
    lines = [f"Chosen on `{metric}` ({better} is better)"
             + (f", the `{selection}` split" if selection else "")
             + f"; reported on the `{split}` split: {len(flat)} trials ({count['completed']} completed, "
             f"{count['stopped']} stopped early, {count['errored']} errored), "
             f"{len(summary['best_per_method'])} methods. An errored trial is never a method's best."]
    if selection == split:
        lines += ["", f"**Warning: trials were chosen (and stopped) on `{split}`, the split they are reported on: "
                      "the chosen scores are biased upwards. Choose on a validation split (`metric: eval/val/...`).**"]
    if errored_only:
        lines += ["", f"Every trial of {', '.join(errored_only)} errored: no configuration to report (see All trials)."]
    lines += ["", f"Accuracies carry their {summary['interval']} interval, `value [low, high]`. Paired tests: "
                  f"{summary['paired_test']}; gained = questions the method gets right and the reference wrong. "
                  "Every number here is the one stored in `results.json`."]
    return lines


def _markdown(summary: Mapping[str, Any], flat: Sequence[Mapping[str, Any]], names: Mapping[str, str],
              errored_only: Sequence[str], name: str) -> str:
    metric, reported, columns = summary["metric"], summary["reported_metric"] or summary["metric"], \
        summary["metric_columns"]
    by_id = {r["trial_id"]: r for r in flat}
    best = [by_id[i] for i in summary["best_per_method"].values()]
    main = METRIC_RE.match(reported)
    prefix = f"{main['kind']}/{main['set']}/" if main else reported
    main_cols = list(dict.fromkeys([metric, *(c for c in columns if c == reported or c.startswith(prefix))]))
    tail = ["status", "steps", "wall_s", "peak_mem_mb"]
    paired, paired_header = _paired_rows(summary, best)
    parts = [f"# Sweep report: {name}", "", *_headline(summary, flat, errored_only), "",
             "## Best configuration per method", "",
             _table(best, ["rank", "method", "towers", "lr", "trainable_params", "trainable_pct", *main_cols,
                           *tail, "trial_id"]),
             "", "![reported metric vs trainable parameters](frontier.png)", "",
             "![learning curves of each method's best trial](curves.png)", ""]
    if any(r.get(f"eval/{summary['reported_split']}/overall_acc") is not None for r in paired):
        parts += ["## Paired comparisons", "", _table(paired, paired_header), ""]
    ood = _ood_columns(columns, metric, reported)
    if ood:
        parts += ["## Out-of-distribution and zero-shot", "",
                  f"The best configuration of each method (chosen on `{metric}`) on the other evaluation sets.", "",
                  _table(best, ["method", "lr", reported, *ood]), ""]
    machines = sorted({json.dumps(t["machine"], sort_keys=True) for t in summary["trials"] if t.get("machine")})
    parts += ["## All trials", "",
              _table(flat, ["rank", "trial_id", "method", "towers", "lr", "trainable_params", "total_params",
                            "trainable_pct", *columns, *tail]),
              "", "## Machine", "", *(f"- trials ran on: {m}" for m in machines),
              f"- report built on: {machine.summary(machine.describe())}",
              f"- built: {datetime.now(timezone.utc).isoformat(timespec='seconds')}"]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m raymed.tune.report EXPERIMENT_DIR [--metric M] [--mode max|min] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m raymed.tune.report", description="Rebuild the sweep report of an experiment folder."
    )
    parser.add_argument("experiment_dir", help="experiment folder or URI (s3://, gs://)")
    parser.add_argument(
        "--metric", help=f"metric to choose each method's trial by (default: the previous report's, else "
                         f"{DEFAULT_METRIC}; {LEGACY_METRIC} for sweeps without a validation split)"
    )
    parser.add_argument(
        "--mode", choices=("max", "min"), help="max or min (default: the previous report's, else max)"
    )
    parser.add_argument("--out", help="output folder or URI (default: EXPERIMENT_DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    previous = _previous_settings(args.experiment_dir)
    metric = args.metric or previous.get("metric")
    mode = args.mode or previous.get("mode") or "max"
    try:
        rows = read_experiment_rows(args.experiment_dir)
        files = build_report(rows, args.out or args.experiment_dir, metric=metric, mode=mode)
    except (ValueError, FileNotFoundError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = storage.read_json(files["results_json"])
    metric, reported = summary["metric"], summary["reported_metric"]
    print(f"{len(rows)} trials ranked by {metric} ({summary['mode']}); best per method"
          + (f", reported on {reported}:" if reported and reported != metric else ":"))
    for label, trial_id in summary["best_per_method"].items():
        t = next(t for t in summary["trials"] if t["trial_id"] == trial_id)
        scored = f"  {reported} {_cell(t['metrics'].get(reported))}" if reported and reported != metric else ""
        print(f"  {label:<24} lr {_cell(t['lr']):<8} {metric} {_cell(t['metrics'].get(metric))}{scored}")
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
