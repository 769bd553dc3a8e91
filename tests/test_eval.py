"""`raymed.eval` / `raymed.eval.infer` in-process on presets, and their errors (the run-folder path is tested with
real training runs in test_train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raymed.eval import evaluate as raymed_eval
from raymed.eval import infer
from raymed.data.prepare import prepare
from raymed.data.source import ReadOptions
from raymed.data.synth import generate
from tests.test_data_readers import r2gen


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root / "raw", n=10, seed=3, style="base")
    prepare("vqa-rad", root / "raw", root / "prepared")
    return root / "prepared"


def test_eval_writes_predictions_whose_scores_are_the_metrics(synth: Path, tmp_path: Path) -> None:
    summary = raymed_eval.evaluate("tiny-llava-med", str(synth), out=tmp_path, max_rows=6, batch_size=4)
    recs = [json.loads(x) for x in (tmp_path / "predictions.jsonl").open()]
    assert len(recs) == summary["rows"] == 6
    assert {"id", "question", "reference", "prediction", "answer_type", "correct"} <= set(recs[0])
    assert sum(r["correct"] for r in recs) / 6 == pytest.approx(summary["metrics"]["overall_acc"])
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == summary["metrics"]


def test_eval_refuses_bad_input(synth: Path, tmp_path: Path) -> None:
    reports = tmp_path / "iu"
    prepare("r2gen", r2gen(tmp_path / "raw"), reports, on_bad="skip", options=ReadOptions(dataset="iu-xray"))
    with pytest.raises(raymed_eval.EvalError, match="MISS .* answers questions.*report"):
        raymed_eval.evaluate("tiny-miss-med", str(reports), split="train")
    with pytest.raises(raymed_eval.EvalError, match="no split 'nope'"):
        raymed_eval.evaluate("tiny-miss-med", str(synth), split="nope")
    with pytest.raises(raymed_eval.EvalError, match="not a prepared dataset"):
        raymed_eval.evaluate("tiny-miss-med", str(tmp_path / "missing"))
    (tmp_path / "run").mkdir()
    assert raymed_eval.main(["--model", str(tmp_path / "run"), "--data", str(synth)]) == 2


def test_infer_answers_and_refuses_bad_images(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from raymed.data.rows import read_split_rows

    row = read_split_rows(synth, "test")[0]
    image = tmp_path / "scan.png"
    image.write_bytes(row["image"])
    assert infer.main(["--model", "tiny-llava-med", "--image", str(image), "--question", row["question"]]) == 0
    assert capsys.readouterr().out.strip()  # an answer
    (tmp_path / "notes.txt").write_text("not an image")
    assert infer.main(["--model", "tiny-llava-med", "--image", str(tmp_path / "notes.txt"), "--question", "x"]) == 2
    assert "notes.txt: unreadable image" in capsys.readouterr().err
    with pytest.raises(infer.InferError, match="no such image file"):
        infer.answer("tiny-llava-med", tmp_path / "absent.png", "x")
