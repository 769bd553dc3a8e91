"""One result row per training run: written by the worker into every checkpoint, read back by every consumer.

A single run (`raymed.train`), each sweep trial (`raymed.tune`) and `raymed.tune.report DIR` all take their rows from
the same place: the `row.json` of a run's latest checkpoint. So a trial that ASHA stopped (its process killed)
still has its row, and rebuilding a sweep's report from its folder gives back the sweep's `results.json`.

Files raymed writes, named so that none is mistaken for Ray's own (`result.json` is Ray Tune's progress log)::

    <run>/epoch-NNNN/row.json        the run's row after epoch NNNN (in the checkpoint, see raymed.train.checkpoint)
    <run>/raymed-result.json         a single run's final row, written by the driver (same content)
    <run>/raymed-error.json          a run that failed: the error, written by the driver or trial
    <run>/raymed-stopped.json        a sweep trial that ASHA stopped: the epoch Tune stopped it at (its workers
                                     may still write a checkpoint or two before they are gone; the row is cut
                                     back to what the scheduler saw), written by the sweep's driver
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raymed import storage
from raymed.machine import describe

ROW_FILE = "row.json"
RUN_RESULT_FILE = "raymed-result.json"
RUN_ERROR_FILE = "raymed-error.json"
RUN_STOPPED_FILE = "raymed-stopped.json"
CHECKPOINT_RE = re.compile(r"^epoch-(\d{4,})$")


def answers(records: Mapping[str, Sequence[Mapping[str, Any]]], prefix: str) -> dict[str, dict[str, str]]:
    """Per eval set, which questions a model answered right: ``{"<prefix>/<set>": {"ids": hash of the question ids
    in order, "correct": "0110..."}}`` (strict exact match, `predict.records`' ``correct``), so that a report can
    test two models on the same questions without their predictions. Sets without per-question scores (report
    generation) and empty record lists (ranks other than 0) are left out."""
    out = {}
    for name, recs in records.items():
        if recs and all("correct" in r for r in recs):
            ids = hashlib.sha256("\n".join(str(r["id"]) for r in recs).encode()).hexdigest()[:16]
            out[f"{prefix}/{name}"] = {"ids": ids, "correct": "".join("1" if r["correct"] else "0" for r in recs)}
    return out


def result_row(cfg: Any, accounting: Mapping[str, Any], history: list[dict[str, Any]], *,
               zero_shot: Mapping[str, Any], wall_s: float, checkpoint: str,
               zero_shot_answers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The row of a run after its latest epoch (``history[-1]``); ``cfg`` is the run's `Config`. Per-question
    correctness (:func:`answers`) comes from the epoch's history entry (``answers``) and ``zero_shot_answers``."""
    last = history[-1]
    epochs = int(last["epoch"])
    metrics = {k: v for k, v in last.items() if k.startswith("eval/")}
    return {
        "trial_id": cfg.run_name(),
        "method": cfg.method.name,
        "towers": cfg.method.towers,
        "lr": cfg.train.lr,
        "model": cfg.as_written()["model"]["name"],
        "params": {"trainable": accounting["trainable"], "total": accounting["total"],
                   "percent": accounting["percent"]},
        "accounting": {k: accounting[k] for k in ("groups", "trainable_groups", "unused")},
        "metrics": {**dict(sorted(zero_shot.items())), **metrics, "loss": last["loss"]},
        "answers": {**dict(zero_shot_answers or {}), **last.get("answers", {})},
        "history": history,
        "epochs": epochs,
        "steps": last["step"],
        "loss": last["loss"],
        "samples_per_s": last.get("samples_per_s"),
        "tokens_per_s": last.get("tokens_per_s"),
        "peak_mem_mb": max(h.get("peak_mem_mb") or 0 for h in history) or None,
        "wall_s": wall_s,
        "stopped_early": epochs < cfg.train.epochs,
        "config_hash": cfg.hash(),
        "config": cfg.as_written(),
        "checkpoint": checkpoint,
        "machine": describe(),
    }


# ---- reading a folder of runs (local paths or URIs) ---------------------------------------------------
def latest_checkpoint(run_dir: str | Path, holding: str | None = None) -> str | None:
    """The newest `epoch-NNNN` checkpoint of a run folder (a path or URI), or with ``holding`` (a relative file
    path such as ``model/raymed.json``) the newest that holds that file; None when there is none. The one place
    that finds a run's checkpoints by name: results, `train.checkpoint.find_checkpoint` and `train.launch.check_resume`."""
    found = sorted((int(m.group(1)), n) for n in storage.listdir(run_dir) if (m := CHECKPOINT_RE.match(n)))
    for _, name in reversed(found):
        ckpt = storage.join(run_dir, name)
        if holding is None or storage.is_file(storage.join(ckpt, *holding.split("/"))):
            return ckpt
    return None


def run_dirs(root: str | Path) -> list[str]:
    """Every run folder below ``root`` (a folder holding `epoch-NNNN/row.json` checkpoints)."""
    dirs = set()
    for path, _ in storage.walk_files(root, ROW_FILE):
        ckpt, _, _ = str(path).rpartition("/") if storage.is_uri(path) else (os.path.dirname(path), "", "")
        if CHECKPOINT_RE.match(ckpt.rstrip("/").rsplit("/", 1)[-1]):
            dirs.add(ckpt.rstrip("/").rsplit("/", 1)[0])
    return sorted(dirs)


def read_run_row(run_dir: str | Path) -> dict[str, Any] | None:
    """The row of a run folder's latest checkpoint, cut back to where a scheduler stopped it, or marked
    `errored` when the run failed."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not storage.is_file(storage.join(ckpt, ROW_FILE)):
        return None
    row = storage.read_json(storage.join(ckpt, ROW_FILE))
    stopped = storage.join(run_dir, RUN_STOPPED_FILE)
    is_stopped = storage.is_file(stopped)
    if is_stopped:
        row = cut_back(row, int(storage.read_json(stopped)["epoch"]))
    error = storage.join(run_dir, RUN_ERROR_FILE)
    # Not failures: a stopped trial's controller dies with it, and so does a finished one's when Tune ends the
    # trial on its last report (ASHA's max_t) before `fit` returns. The checkpoints say the run is complete.
    if not is_stopped and not completed(row) and storage.is_file(error):
        row["error"] = storage.read_json(error).get("error")
        row["stopped_early"] = False
    return row


def completed(row: Mapping[str, Any]) -> bool:
    """Whether a run's row is that of its last epoch (every epoch trained and checkpointed)."""
    total = (row.get("config") or {}).get("train", {}).get("epochs")
    return total is not None and int(row.get("epochs", 0)) >= int(total)


def run_completed(run_dir: str | Path) -> bool:
    """Whether a run folder holds the checkpoint of its last epoch."""
    ckpt = latest_checkpoint(run_dir)
    return (ckpt is not None and storage.is_file(storage.join(ckpt, ROW_FILE))
            and completed(storage.read_json(storage.join(ckpt, ROW_FILE))))


def read_result_rows(root: str | Path) -> list[dict[str, Any]]:
    """The rows of every run below an experiment (or run) folder, ordered by trial id."""
    root = storage.resolve(root)
    if not storage.is_dir(root):
        raise FileNotFoundError(f"experiment folder {root} does not exist")
    rows = [r for d in run_dirs(root) if (r := read_run_row(d)) is not None]
    return sorted(rows, key=lambda r: r["trial_id"])


def read_errors(root: str | Path) -> dict[str, str]:
    """Run folder -> its error's one-line summary, for every run below ``root`` that left a `raymed-error.json`."""
    out = {}
    for path, _ in storage.walk_files(root, RUN_ERROR_FILE):
        doc = storage.read_json(path)
        out[path.rsplit("/", 1)[0]] = str(doc.get("summary") or doc.get("error"))
    return out


def cut_back(row: dict[str, Any], epoch: int) -> dict[str, Any]:
    """A row as it stood after `epoch` (the scheduler's last view of a stopped trial), marked stopped early."""
    history = [h for h in row["history"] if h["epoch"] <= epoch]
    if not history or history[-1]["epoch"] == row["epochs"]:
        return {**row, "stopped_early": True}
    last = history[-1]
    zero_shot = {k: v for k, v in row["metrics"].items() if k.startswith("zeroshot/")}
    zero_shot_answers = {k: v for k, v in (row.get("answers") or {}).items() if k.startswith("zeroshot/")}
    return {**row, "history": history, "epochs": int(last["epoch"]), "steps": last["step"], "loss": last["loss"],
            "metrics": {**zero_shot, **{k: v for k, v in last.items() if k.startswith("eval/")}, "loss": last["loss"]},
            "answers": {**zero_shot_answers, **last.get("answers", {})},
            "samples_per_s": last.get("samples_per_s"), "tokens_per_s": last.get("tokens_per_s"),
            "stopped_early": True}


def write_stopped(run_dir: str | Path, epoch: int) -> None:
    """Mark a sweep trial as stopped by the scheduler after `epoch`."""
    storage.write_text(storage.join(run_dir, RUN_STOPPED_FILE), json.dumps({"epoch": epoch}))


def write_error(run_dir: str | Path, error: BaseException) -> None:
    """Mark a run as failed (its checkpoints, if any, stay readable): the error (its start and end when long)
    and a one-line summary, the error's own last line (a worker group's error ends with the worker's)."""
    text = f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    storage.write_text(storage.join(run_dir, RUN_ERROR_FILE), json.dumps({
        "error": text if len(text) <= 4000 else f"{text[:2000]}\n...\n{text[-2000:]}",
        "summary": lines[-1] if lines else type(error).__name__,
    }))
