"""Sweep report: files, ranking, Pareto front, numbers in report.md equal to results.json, errors, CLI."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from raymed.tune.plots import pareto_front
from raymed.tune.report import build_report, main, normalize_row, read_experiment_rows

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
TOTAL = 1_000_000


def _row(
    trial_id: str, method: str, lr: float, trainable: int, acc: float | None, **extra: Any
) -> dict[str, Any]:
    metrics = {
        "eval/test/closed_acc": 0.5,
        "eval/test/open_recall": 0.123456789,
        "eval/ood/overall_acc": 0.25,
        "zeroshot/test/overall_acc": 0.1,
    }
    if acc is not None:
        metrics["eval/test/overall_acc"] = acc
    row = {
        "trial_id": trial_id, "method": method, "towers": ["language_model"], "lr": lr,
        "params": {"trainable": trainable, "total": TOTAL, "percent": 100 * trainable / TOTAL},
        "metrics": metrics, "steps": 40, "wall_s": 12.345, "peak_mem_mb": 512.25, "stopped_early": False,
        "config_hash": f"h{trial_id}",
    }
    row.update(extra)
    return row


ROWS = [
    _row("t1", "full", 1e-5, TOTAL, 0.70),
    _row("t2", "full", 1e-4, TOTAL, 0.60, stopped_early=True),
    _row("t3", "ln", 1e-4, 1_536, 0.66666666),
    _row("t4", "ln", 1e-3, 1_536, 0.50),
    _row("t5", "lora", 1e-4, 20_000, 0.62),  # dominated by ln: more parameters, lower accuracy
    _row("t6", "ffn", 1e-4, 500_000, None, stopped_early=True),  # stopped before its first evaluation
]


def md_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Parse every markdown table under its '## heading' into dicts of cell text."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, header = line[3:].strip(), None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if header is None:
                header = cells
                tables[heading] = []
            else:
                tables[heading].append(dict(zip(header, cells)))
        elif not line.startswith("|"):
            header = None
    return tables


def cell_number(cell: str) -> float | None:
    """The number of a report.md cell (an accuracy's cell also holds its interval: ``0.6 [0.51, 0.68]``)."""
    return None if cell == "-" else float(cell.split(" [")[0])


def cell_interval(cell: str) -> list[float] | None:
    """The interval of an accuracy's cell, None when it has none."""
    if " [" not in cell:
        return None
    return [float(x) for x in cell.split(" [")[1].rstrip("]").split(", ")]


def test_build_report_writes_its_files(tmp_path: Path) -> None:
    history = [{"epoch": e, "loss": 1.0 / e, "eval/test/overall_acc": 0.5 + e / 10} for e in (1, 2)]
    files = build_report([{**r, "history": history} for r in ROWS], tmp_path)
    assert {p.name for p in files.values()} == {"results.json", "results.csv", "report.md", "frontier.png",
                                                "curves.png"}
    for png in ("frontier_png", "curves_png"):
        with Image.open(files[png]) as img:
            img.verify()
        with Image.open(files[png]) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
    assert "curves.png" in files["report_md"].read_text()

    summary = json.loads(files["results_json"].read_text())
    assert summary["metric"] == "eval/test/overall_acc" and summary["mode"] == "max"
    assert [t["trial_id"] for t in summary["trials"]] == ["t1", "t3", "t5", "t2", "t4", "t6"]
    assert [t["rank"] for t in summary["trials"]] == [1, 2, 3, 4, 5, None]
    assert summary["best_per_method"] == {"full": "t1", "ln": "t3", "lora": "t5", "ffn": "t6"}
    t3 = summary["trials"][1]
    assert t3["metrics"]["eval/test/overall_acc"] == 0.6667  # 4 significant digits
    assert t3["metrics"]["eval/test/open_recall"] == 0.1235
    assert t3["params"] == {"trainable": 1536, "total": TOTAL, "percent": 0.1536}
    assert t3["wall_s"] == 12.3

    with files["results_csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ROWS)
    assert {"method", "towers", "lr", "trainable_params", "trainable_pct", "steps", "wall_s", "peak_mem_mb",
            "stopped_early", "eval/test/overall_acc", "eval/ood/overall_acc",
            "zeroshot/test/overall_acc"} <= set(rows[0])
    assert rows[1]["trial_id"] == "t3" and float(rows[1]["eval/test/overall_acc"]) == 0.6667
    assert rows[-1]["eval/test/overall_acc"] == ""


def test_report_md_numbers_are_those_of_results_json(tmp_path: Path) -> None:
    files = build_report(ROWS, tmp_path)
    summary = json.loads(files["results_json"].read_text())
    trials = {t["trial_id"]: t for t in summary["trials"]}
    text = files["report_md"].read_text()
    tables = md_tables(text)
    assert set(tables) >= {"Best configuration per method", "All trials", "Out-of-distribution and zero-shot"}

    all_rows = tables["All trials"]
    assert [r["trial_id"] for r in all_rows] == [t["trial_id"] for t in summary["trials"]]
    for r in all_rows:
        t = trials[r["trial_id"]]
        for name in summary["metric_columns"]:
            assert cell_number(r[name]) == t["metrics"].get(name), (r["trial_id"], name)
        assert float(r["lr"]) == t["lr"]
        assert int(r["trainable_params"]) == t["params"]["trainable"]
        assert float(r["trainable_pct"]) == t["params"]["percent"]
        assert (int(r["steps"]), float(r["wall_s"]), float(r["peak_mem_mb"])) == (
            t["steps"], t["wall_s"], t["peak_mem_mb"])
        assert r["status"] == t["status"] == ("stopped" if t["stopped_early"] else "completed")

    best = tables["Best configuration per method"]
    assert [r["method"] for r in best] == ["full", "ln", "lora", "ffn"]  # sorted by the metric
    for r in best:
        assert r["trial_id"] == summary["best_per_method"][r["method"]]
        stored = trials[r["trial_id"]]["metrics"].get("eval/test/overall_acc")
        assert cell_number(r["eval/test/overall_acc"]) == stored

    ood = tables["Out-of-distribution and zero-shot"]
    assert list(ood[0]) == ["method", "lr", "eval/test/overall_acc", "eval/ood/overall_acc",
                            "zeroshot/test/overall_acc"]
    assert float(ood[0]["eval/ood/overall_acc"]) == 0.25
    assert "## Machine" in text and "report built on" in text


def test_mode_min_and_pareto_front() -> None:
    # (trainable, metric): index 2 dominates 3 (fewer params, better); 1 ties 0 on metric with more params
    points = [(10.0, 0.5), (100.0, 0.5), (50.0, 0.8), (60.0, 0.7), (1000.0, 0.9)]
    assert pareto_front(points, "max") == [0, 2, 4]
    assert pareto_front(points, "min") == [0]
    assert pareto_front([], "max") == []


def test_rank_by_min_metric(tmp_path: Path) -> None:
    rows = [_row("a", "ln", 1e-3, 10, 0.9, metrics={"eval/test/loss": 0.3}),
            _row("b", "full", 1e-3, 100, 0.9, metrics={"eval/test/loss": 0.1})]
    files = build_report(rows, tmp_path, metric="eval/test/loss", mode="min")
    summary = json.loads(files["results_json"].read_text())
    assert [t["trial_id"] for t in summary["trials"]] == ["b", "a"]


def test_methods_with_several_tower_choices_are_separate(tmp_path: Path) -> None:
    rows = [_row("a", "ln", 1e-3, 10, 0.6, towers=["language_model"]),
            _row("b", "ln", 1e-3, 20, 0.7, towers=["vision_tower", "language_model"])]
    summary = json.loads(build_report(rows, tmp_path)["results_json"].read_text())
    assert summary["best_per_method"] == {"ln [vision_tower+language_model]": "b", "ln [language_model]": "a"}


def test_several_base_models_are_compared_per_model(tmp_path: Path) -> None:
    rows = [_row("a", "ln", 1e-3, 10, 0.6, model="tiny-llava-med"), _row("b", "ln", 1e-3, 20, 0.7, model="tiny-miss-med"),
            _row("c", "ln", 3e-3, 10, 0.5, model="tiny-llava-med")]
    summary = json.loads(build_report(rows, tmp_path)["results_json"].read_text())
    assert summary["best_per_method"] == {"tiny-miss-med · ln": "b", "tiny-llava-med · ln": "a"}
    one_model = json.loads(build_report(rows[::2], tmp_path / "one")["results_json"].read_text())
    assert one_model["best_per_method"] == {"ln": "a"}


def test_unknown_metric_names_it_and_lists_available(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        build_report(ROWS, tmp_path, metric="eval/test/overal_acc")
    message = str(err.value)
    assert "'eval/test/overal_acc' is reported by no trial" in message
    assert "Did you mean 'eval/test/overall_acc'" in message
    assert "eval/ood/overall_acc" in message and "zeroshot/test/overall_acc" in message
    with pytest.raises(ValueError, match="mode must be"):
        build_report(ROWS, tmp_path, mode="best")
    with pytest.raises(ValueError, match="no trial results"):
        build_report([], tmp_path)
    with pytest.raises(ValueError, match="repeated: t1"):
        build_report([ROWS[0], ROWS[0]], tmp_path)


def test_invalid_rows_report_every_problem() -> None:
    with pytest.raises(ValueError) as err:
        normalize_row({"trial_id": "x", "metrics": {"acc": "high"}, "lr": "fast"}, "run x/result.json")
    message = str(err.value)
    assert "run x/result.json: missing key 'method'" in message
    assert "metric 'acc' must be a number, got 'high'" in message
    assert "'lr' must be a number" in message


def _write_run(root: Path, row: dict[str, Any], epochs: int = 1) -> Path:
    """A run folder as training leaves it: epoch-NNNN checkpoints, each with the row after that epoch."""
    for e in range(1, epochs + 1):
        ckpt = root / row["trial_id"] / f"epoch-{e:04d}"
        ckpt.mkdir(parents=True)
        (ckpt / "row.json").write_text(json.dumps({**row, "steps": 10 * e}))
    return root / row["trial_id"]


def test_read_experiment_rows_reads_each_runs_latest_checkpoint_and_never_tune_logs(tmp_path: Path) -> None:
    for i, row in enumerate(ROWS[:3]):
        _write_run(tmp_path / "runs", row, epochs=i + 1)
        # Ray Tune's own result.json (JSON lines of progress) is never read as a row
        (tmp_path / f"trial_{i}").mkdir()
        (tmp_path / f"trial_{i}" / "result.json").write_text(json.dumps({**row, "trial_id": "tune"}))
    rows = read_experiment_rows(tmp_path)
    assert [(r["trial_id"], r["steps"]) for r in rows] == [("t1", 10), ("t2", 20), ("t3", 30)]

    from raymed.tune.results import write_error

    write_error(tmp_path / "runs" / "t2", RuntimeError("worker died"))
    t2 = next(r for r in read_experiment_rows(tmp_path) if r["trial_id"] == "t2")
    assert t2["error"] == "RuntimeError: worker died" and t2["stopped_early"] is False
    # A run whose last epoch is checkpointed did not fail, even if its controller died after it (Tune ends a
    # trial on its last report, sometimes before `fit` returns).
    finished = _write_run(tmp_path / "runs", {**ROWS[3], "epochs": 2, "config": {"train": {"epochs": 2}}}, 2)
    write_error(finished, RuntimeError("ActorDiedError: placement group removed"))
    t4 = next(r for r in read_experiment_rows(tmp_path) if r["trial_id"] == "t4")
    assert "error" not in t4
    shutil.rmtree(finished)

    build_report(rows, tmp_path / "report")
    again = read_experiment_rows(tmp_path / "report")  # from results.json when no run folder is there
    assert sorted(r["trial_id"] for r in again) == ["t1", "t2", "t3"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no trial results under"):
        read_experiment_rows(tmp_path / "empty")


def test_one_latest_checkpoint_finder_for_results_export_and_resume(tmp_path: Path) -> None:
    """Epoch folders compare by number (epoch-10000 after epoch-9999), never by name; other names are ignored;
    `holding` skips a newest checkpoint that lacks the file (an incomplete one), as `find_checkpoint` needs."""
    from raymed.train.checkpoint import find_checkpoint
    from raymed.tune.results import latest_checkpoint

    run = tmp_path / "run"
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in ("epoch-0009", "epoch-9999", "epoch-10000", "epoch-0010.tmp", "epoch-1", "checkpoint_000001"):
        (run / name).mkdir(parents=True)
    (run / "epoch-9999" / "model").mkdir()
    (run / "epoch-9999" / "model" / "raymed.json").write_text("{}")
    assert latest_checkpoint(run) == str(run / "epoch-10000")
    assert latest_checkpoint(run, holding="model/raymed.json") == str(run / "epoch-9999")
    assert find_checkpoint(run) == str(run / "epoch-9999")
    assert latest_checkpoint(run, holding="row.json") is None
    with pytest.raises(FileNotFoundError, match="no raymed checkpoint in this folder"):
        find_checkpoint(run / "epoch-0009")


def test_rebuilding_from_the_folder_gives_the_same_results_json(tmp_path: Path) -> None:
    for row in ROWS:
        _write_run(tmp_path / "exp" / "runs", row, epochs=2)
    first = build_report(read_experiment_rows(tmp_path / "exp"), tmp_path / "exp")["results_json"].read_text()
    assert main([str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "results.json").read_text() == first
    assert len(json.loads(first)["trials"]) == len(ROWS)  # the stopped trials (t2, t6) included


def test_cli_rebuilds_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path, ROWS[0])
    _write_run(tmp_path, ROWS[2])
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "best per method" in out and (tmp_path / "report.md").is_file()
    assert main([str(tmp_path), "--metric", "nope"]) == 2
    assert "'nope' is reported by no trial" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"trials": ROWS[:2]}))
    proc = subprocess.run([sys.executable, "-m", "raymed.tune.report", str(tmp_path), "--mode", "max"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "frontier.png").is_file() and "wrote" in proc.stdout


def test_a_stopped_trial_is_cut_back_to_the_epoch_the_scheduler_saw(tmp_path: Path) -> None:
    from raymed.tune.results import write_error, write_stopped

    history = [{"epoch": e, "step": 10 * e, "loss": 1.0 / e, "eval/test/overall_acc": e / 10} for e in (1, 2, 3)]
    row = {**ROWS[0], "history": history, "epochs": 3, "steps": 30, "loss": 1 / 3,
           "metrics": {"zeroshot/test/overall_acc": 0.1, "eval/test/overall_acc": 0.3, "loss": 1 / 3}}
    run = _write_run(tmp_path, row)
    write_stopped(run, 2)  # Tune stopped it after epoch 2; its workers still checkpointed epoch 3
    write_error(run, RuntimeError("controller died with the trial"))
    [cut] = read_experiment_rows(tmp_path)
    assert cut["epochs"] == 2 and cut["steps"] == 20 and cut["stopped_early"] is True and "error" not in cut
    assert cut["metrics"] == {"zeroshot/test/overall_acc": 0.1, "eval/test/overall_acc": 0.2, "loss": 0.5}


# ---- selection on validation, intervals, paired tests, status ----------------------------------------------------
ZERO_SHOT = [1, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # the base model's answers to the 10 test questions (1 = right)


def _scored(trial_id: str, method: str, val: float, test: list[int], **extra: Any) -> dict[str, Any]:
    """A row as training writes it: val and test accuracies with their question counts, and per-question answers."""
    n = len(test)
    counts = {"n_closed": 6, "n_open": n - 6}
    metrics = {"eval/val/overall_acc": val, **{f"eval/val/{k}": 10 for k in ("n_closed", "n_open")},
               "eval/test/overall_acc": sum(test) / n, **{f"eval/test/{k}": v for k, v in counts.items()},
               "zeroshot/test/overall_acc": sum(ZERO_SHOT) / n, "zeroshot/val/overall_acc": 0.45,
               **{f"zeroshot/test/{k}": v for k, v in counts.items()}}
    answers = {"eval/test": {"ids": "q10", "correct": "".join(map(str, test))},
               "zeroshot/test": {"ids": "q10", "correct": "".join(map(str, ZERO_SHOT))}}
    return _row(trial_id, method, 1e-3, 100, None, metrics=metrics, answers=answers,
                config={"data": {"eval_split": "test"}}, **extra)


SCORED = [
    _scored("a", "ln", 0.60, [1, 1, 1, 1, 0, 0, 1, 1, 0, 0]),
    _scored("b", "ln", 0.50, [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]),  # better on test, worse on val: not chosen
    _scored("c", "lora", 0.55, [0, 1, 1, 1, 1, 1, 0, 1, 1, 1]),
    _scored("d", "lora", 0.90, [1] * 10, error="RuntimeError: worker died"),  # best on val, but errored
    _scored("e", "full", 0.40, [0, 1, 0, 0, 0, 0, 1, 0, 0, 0], stopped_early=True),
    _scored("f", "ffn", 0.70, [1] * 10, error="RuntimeError: out of memory"),  # every ffn trial errored
]


def test_each_method_is_chosen_on_val_and_reported_on_test_with_intervals(tmp_path: Path) -> None:
    from raymed.tune.stats import proportion_ci

    files = build_report(SCORED, tmp_path)
    summary = json.loads(files["results_json"].read_text())
    assert (summary["metric"], summary["selection_split"]) == ("eval/val/overall_acc", "val")
    assert (summary["reported_metric"], summary["reported_split"]) == ("eval/test/overall_acc", "test")
    assert summary["best_per_method"] == {"ln": "a", "lora": "c", "full": "e"}  # never d (errored), no ffn at all
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert {i: t["status"] for i, t in trials.items()} == {
        "a": "completed", "b": "completed", "c": "completed", "d": "errored", "e": "stopped", "f": "errored"}
    assert [t["trial_id"] for t in summary["trials"]] == ["a", "c", "b", "e", "d", "f"]
    assert trials["d"]["rank"] is None and trials["f"]["rank"] is None
    # exact intervals from each accuracy's question count: a has 6 of 10 test questions right, 60% of 20 on val
    assert trials["a"]["intervals"]["eval/test/overall_acc"] == [float(f"{x:.4g}") for x in proportion_ci(6, 10)]
    assert trials["a"]["intervals"]["eval/val/overall_acc"] == [float(f"{x:.4g}") for x in proportion_ci(12, 20)]

    text = files["report_md"].read_text()
    assert "Chosen on `eval/val/overall_acc` (higher is better), the `val` split; reported on the `test` split" in text
    assert "Every trial of ffn errored" in text and "Warning" not in text
    tables = md_tables(text)
    best = tables["Best configuration per method"]
    assert [(r["method"], r["trial_id"], r["status"]) for r in best] == [
        ("ln", "a", "completed"), ("lora", "c", "completed"), ("full", "e", "stopped")]
    for r in best + tables["All trials"]:  # every accuracy cell: the value and interval of results.json
        t = trials[r["trial_id"]]
        for name in ("eval/val/overall_acc", "eval/test/overall_acc"):
            assert cell_number(r[name]) == t["metrics"][name] and cell_interval(r[name]) == t["intervals"][name]
    assert {r["trial_id"]: r["status"] for r in tables["All trials"]} == {i: t["status"] for i, t in trials.items()}
    # the other sets: zero-shot on test; nothing of the selection split, which chooses rather than reports
    assert list(tables["Out-of-distribution and zero-shot"][0]) == [
        "method", "lr", "eval/test/overall_acc", "zeroshot/test/overall_acc"]


def test_chosen_trials_are_tested_against_zero_shot_and_ln_on_the_same_questions(tmp_path: Path) -> None:
    from raymed.tune.stats import mcnemar

    summary = json.loads(build_report(SCORED, tmp_path)["results_json"].read_text())
    tests = summary["comparisons"]
    # lora (c) against zero-shot: right on 8 questions zero-shot missed, wrong on the 2 it got (1 and 7), so
    # p = 2 * P(X <= 2 | 10, 1/2) = 2 * 56/1024 by hand; against ln (a): gains questions 5, 6, 9, 10, loses 1 and 7,
    # p = 2 * P(X <= 2 | 6, 1/2) = 2 * 22/64.
    assert tests["lora"]["zero-shot"] == {"gained": 8, "lost": 2, "p": 0.1094, "n": 10}
    assert tests["lora"]["ln"] == {"gained": 4, "lost": 2, "p": 0.6875, "n": 10} and tests["lora"]["ln_trial"] == "a"
    c, a = [1 if x == "1" else 0 for x in SCORED[2]["answers"]["eval/test"]["correct"]], \
        [int(x) for x in SCORED[0]["answers"]["eval/test"]["correct"]]
    assert tests["lora"]["ln"]["p"] == float(f"{mcnemar(a, c)['p']:.4g}")
    assert tests["ln"]["ln"] is None and tests["ln"]["zero-shot"] == {"gained": 4, "lost": 0, "p": 0.125, "n": 10}
    paired = {r["method"]: r for r in md_tables(build_report(SCORED, tmp_path)["report_md"].read_text())[
        "Paired comparisons"]}
    assert paired["lora"]["gained vs ln"] == "4" and float(paired["lora"]["p vs zero-shot"]) == 0.1094
    assert paired["ln"]["p vs ln"] == "-" and paired["full"]["ln trial"] == "a"
    # other questions (another ids hash) are never paired
    other = [{**SCORED[0], "answers": {"eval/test": {"ids": "other", "correct": "1" * 10}}}, *SCORED[1:]]
    assert json.loads(build_report(other, tmp_path / "x")["results_json"].read_text())["comparisons"]["lora"][
        "ln"] is None


def test_choosing_on_the_reported_split_is_flagged(tmp_path: Path) -> None:
    text = build_report(SCORED, tmp_path, metric="eval/test/overall_acc")["report_md"].read_text()
    assert "**Warning: trials were chosen (and stopped) on `test`, the split they are reported on" in text
    # a sweep from before validation splits: chosen on test by default, and said so
    old = build_report(ROWS, tmp_path / "old")["report_md"].read_text()
    assert "Chosen on `eval/test/overall_acc`" in old and "**Warning" in old


def test_answers_follow_the_reported_epoch_and_survive_a_rebuild(tmp_path: Path) -> None:
    from raymed.tune.results import write_stopped

    def epoch(e: int) -> dict[str, Any]:
        return {"epoch": e, "step": 10 * e, "loss": 1.0 / e, "eval/test/overall_acc": e / 10,
                "answers": {"eval/test": {"ids": "q3", "correct": "100" if e < 3 else "111"}}}

    row = {**SCORED[0], "trial_id": "run", "history": [epoch(e) for e in (1, 2, 3)], "epochs": 3,
           "answers": {"eval/test": {"ids": "q3", "correct": "111"}, "zeroshot/test": {"ids": "q3", "correct": "000"}}}
    write_stopped(_write_run(tmp_path / "exp" / "runs", row), 2)
    [cut] = read_experiment_rows(tmp_path / "exp")
    assert cut["answers"] == {"eval/test": {"ids": "q3", "correct": "100"},
                              "zeroshot/test": {"ids": "q3", "correct": "000"}}
    assert all("answers" not in h for h in cut["history"])  # per-epoch answers stay in the checkpoints only
    first = build_report([cut], tmp_path / "report")["results_json"].read_text()
    rebuilt = build_report(read_experiment_rows(tmp_path / "report"), tmp_path / "report")  # from results.json alone
    assert rebuilt["results_json"].read_text() == first
    with pytest.raises(ValueError, match="'answers' must map eval sets to"):
        normalize_row({**SCORED[0], "answers": {"eval/test": {"ids": "q", "correct": "yes"}}})
