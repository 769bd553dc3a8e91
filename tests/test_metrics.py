"""Metrics: hand-computed VQA scores and report-generation scores from pycocoevalcap."""

from __future__ import annotations

import logging
import math
import shutil

import pytest

from raymed.eval import metrics
from raymed.eval.metrics import normalize_answer, report_metrics, token_recall, vqa_metrics

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),
        ("  The Left  Lung. ", "left lung"),
        ("An X-ray!", "x ray"),
        ("a", ""),
        ("theory", "theory"),  # articles are whole words only
        (3, "3"),  # answers stored as integers in real files
        (None, ""),
    ],
)
def test_normalize_answer(raw: object, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_token_recall_by_hand() -> None:
    # reference tokens {left, lower, lung}; the prediction has left and lung -> 2/3
    assert token_recall("left lung", "The left lower lung") == pytest.approx(2 / 3)
    assert token_recall("lung", "left left lung") == pytest.approx(1 / 3)  # multiset, clipped
    assert token_recall("left left left", "left lung") == pytest.approx(1 / 2)
    assert token_recall("anything", "") == 0.0


def test_vqa_metrics_by_hand() -> None:
    preds = ["Yes", "no", "left lung", "the heart", "left lung"]
    refs = ["yes", "yes", "Left lung.", "heart", "right lung"]
    types = ["CLOSED ", "closed", "OPEN", "open", "OPEN"]  # dirty values as found in real files
    out = vqa_metrics(preds, refs, types)
    assert out["n_closed"] == 2 and out["n_open"] == 3
    assert out["closed_acc"] == pytest.approx(1 / 2)
    assert out["open_acc"] == pytest.approx(2 / 3)
    assert out["open_recall"] == pytest.approx((1 + 1 + 1 / 2) / 3)  # "lung" of "right lung" is found
    assert out["overall_acc"] == pytest.approx(3 / 5)


def test_vqa_metrics_infers_closed_from_yes_no() -> None:
    out = vqa_metrics(["yes", "liver"], ["Yes", "spleen"])
    assert (out["n_closed"], out["n_open"]) == (1, 1)
    assert out["closed_acc"] == 1.0 and out["open_acc"] == 0.0


def test_vqa_metrics_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        vqa_metrics(["a", "b"], ["a"], ["OPEN"])
    with pytest.raises(ValueError, match="'MAYBE' at index 1"):
        vqa_metrics(["a", "b"], ["a", "b"], ["OPEN", "MAYBE"])
    empty = vqa_metrics([], [], [])
    assert empty["overall_acc"] == 0.0 and empty["n_open"] == 0


def test_report_metrics_identical_reports() -> None:
    reports = ["The heart is normal in size.", "No acute cardiopulmonary abnormality is seen."]
    out = report_metrics(reports, reports, meteor=False)
    for n in range(1, 5):
        assert out[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)
    assert out["rouge_l"] == pytest.approx(1.0)
    # CIDEr-D is scaled by 10; identical reports with >= 4 words each reach the maximum
    assert out["cider"] == pytest.approx(10.0)
    assert "meteor" not in out


def test_report_metrics_by_hand() -> None:
    # 3 of 4 unigrams, 2 of 3 bigrams, 1 of 2 trigrams, 0 of 1 four-gram match; equal lengths (BP = 1)
    out = report_metrics(["the heart is normal"], ["the heart is enlarged"], meteor=False)
    assert out["bleu1"] == pytest.approx(3 / 4, rel=1e-6)
    assert out["bleu2"] == pytest.approx(math.sqrt(3 / 4 * 2 / 3), rel=1e-6)
    assert out["bleu3"] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3), rel=1e-6)
    assert out["bleu4"] < 1e-3
    assert out["rouge_l"] == pytest.approx(3 / 4)  # LCS 3 of 4 words on both sides
    assert out["cider"] == 0.0  # one sample: every n-gram has document frequency 1, idf 0


def test_report_metrics_multiple_references_and_errors() -> None:
    out = report_metrics(["heart normal"], [["lungs clear", "heart normal"]], meteor=False)
    assert out["bleu1"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        report_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        report_metrics([], [])


def test_meteor_absent_without_java(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="raymed.eval.metrics"):
        out = report_metrics(["heart normal"], ["heart normal"])
    assert "meteor" not in out and "bleu1" in out
    assert "METEOR skipped: Java is not on PATH" in caplog.text


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_absent_when_process_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pycocoevalcap.meteor import meteor as meteor_module

    monkeypatch.setattr(meteor_module, "METEOR_JAR", "missing-meteor.jar")
    monkeypatch.setattr(metrics, "_METEOR", None)  # no JVM of an earlier test to reuse
    with caplog.at_level(logging.WARNING, logger="raymed.eval.metrics"):
        out = report_metrics(["heart normal"], ["heart normal"])
    assert "meteor" not in out
    assert "the METEOR process failed" in caplog.text


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_keeps_one_jvm_per_process_and_replaces_a_dead_one() -> None:
    """Every evaluation of a report run scores METEOR: one JVM per process, not one per call (~10 s of CPU each)."""
    first = report_metrics(["the heart is normal"], ["the heart is enlarged"])["meteor"]
    pid = metrics._METEOR.meteor_p.pid
    assert report_metrics(["the heart is normal"], ["the heart is enlarged"])["meteor"] == first
    assert metrics._METEOR.meteor_p.pid == pid
    metrics._METEOR.meteor_p.kill()
    metrics._METEOR.meteor_p.wait()
    assert report_metrics(["the heart is normal"], ["the heart is enlarged"])["meteor"] == first
    assert metrics._METEOR.meteor_p.pid != pid


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_identical_is_one() -> None:
    # Starting METEOR loads its paraphrase table: ~10 s, the slowest test here.
    out = report_metrics(["the heart is normal"], ["the heart is normal"])
    assert out["meteor"] == pytest.approx(1.0)


# ---- the published scoring rules (LLaVA-Med run_eval.py, MISS ACC.py) beside the strict one -----------------
# (prediction, reference, answer type, strict hit, strict recall, llava-med score, miss score or None)
RULE_CASES = [
    # a verbose closed answer: right for LLaVA-Med (yes present, "yes" contained), wrong for strict and MISS
    ("Yes, there is a fracture of the", "yes", "CLOSED", 0.0, None, 1.0, 0.0),
    # number words: LLaVA-Med maps "two" -> "2", so its open recall is 1; strict recall finds no "2"
    ("there are two nodules", "2", "OPEN", 0.0, 0.0, 1.0, None),
    # MISS compares raw strings: "Yes" and "yes" are the same answer, "yes." is not yes at all
    ("Yes", "yes", "CLOSED", 1.0, None, 1.0, 1.0),
    ("yes.", "yes", "CLOSED", 1.0, None, 1.0, 0.0),
    ("no", "Yes", "CLOSED", 0.0, None, 0.0, 0.0),
    # LLaVA-Med's substring tests: "no" inside "nodule" counts as a yes/no, then "no" is contained
    ("a nodule", "no", "CLOSED", 0.0, None, 1.0, 0.0),
    # a closed question with a non-yes/no answer: LLaVA-Med needs yes/no in the prediction; MISS skips it
    ("left", "left", "CLOSED", 1.0, None, 0.0, None),
    ("yes, the left one", "left", "CLOSED", 0.0, None, 1.0, None),
    # calculate_f1score counts true positives by the prediction's counts: "lung lung" vs "left lung" = 2/3
    ("lung lung", "left lung", "OPEN", 0.0, 0.5, 2 / 3, None),
    ("none", "0", "OPEN", 0.0, 0.0, 1.0, None),
    ("", "liver", "OPEN", 0.0, 0.0, 0.0, None),
]


@pytest.mark.parametrize(("pred", "ref", "kind", "strict", "recall", "llava", "miss"), RULE_CASES)
def test_score_rows_each_rule_by_hand(pred: str, ref: str, kind: str, strict: float, recall: float | None,
                                      llava: float, miss: float | None) -> None:
    (row,) = metrics.score_rows([pred], [ref], [kind])
    assert row["overall_acc"] == strict
    if kind == "CLOSED":
        assert row["closed_acc"] == strict and row["closed_acc@llava-med"] == llava
        assert "open_recall" not in row and "open_recall@llava-med" not in row
    else:
        assert row["open_acc"] == strict and row["open_recall"] == pytest.approx(recall)
        assert row["open_recall@llava-med"] == pytest.approx(llava)
        assert "closed_acc@llava-med" not in row
    assert row.get("closed_acc@miss") == miss


def test_vqa_metrics_reports_every_rule_on_the_same_predictions() -> None:
    preds = [c[0] for c in RULE_CASES]
    refs = [c[1] for c in RULE_CASES]
    out = metrics.vqa_metrics(preds, refs, [c[2] for c in RULE_CASES])
    assert tuple(out) == metrics.VQA_KEYS
    closed = [c for c in RULE_CASES if c[2] == "CLOSED"]
    opened = [c for c in RULE_CASES if c[2] == "OPEN"]
    assert out["closed_acc@llava-med"] == pytest.approx(sum(c[5] for c in closed) / len(closed))
    assert out["open_recall@llava-med"] == pytest.approx(sum(c[5] for c in opened) / len(opened))
    scored = [c[6] for c in RULE_CASES if c[6] is not None]
    assert out["n_closed@miss"] == len(scored) == 5
    assert out["closed_acc@miss"] == pytest.approx(sum(scored) / len(scored))
    # the strict keys are unchanged by the new rules
    strict = {k: out[k] for k in ("closed_acc", "open_acc", "open_recall", "overall_acc", "n_closed", "n_open")}
    assert strict["closed_acc"] == pytest.approx(3 / 7) and strict["n_open"] == 4


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes, there is a fracture of the", "yes there is fracture of"),  # ", " -> deleted
        ("left-sided (mild)", "left sided mild"),  # no space beside "-" / "(" -> a space
        ("1,000 cells. 3.5 cm", "1000 cells 3.5 cm"),  # digit,digit: punctuation deleted; "3.5" kept
        ("Two or THREE", "2 or 3"),
        ("dont know, isnt it", "don't know isn't it"),  # contractions get their apostrophe back
        ("couldnt've", "couldn't've"),
        ("its the ANSWER: no", "its answer: no"),  # ":" is not in LLaVA-Med's punctuation list
    ],
)
def test_llava_med_normalize(raw: str, expected: str) -> None:
    assert metrics.llava_med_normalize(raw) == expected


def test_llava_med_normalize_period_quirk() -> None:
    # glossary.py passes re.UNICODE (32) as `count`: at most 32 periods are removed
    assert metrics.llava_med_normalize("." * 40 + "x") == "." * 8 + "x"
