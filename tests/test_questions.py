"""`python -m raymed.tune.questions` (`raymed questions`): per-question-type accuracy and the paired test against zero-shot.

The analysis end to end (a real sweep's checkpoints) runs in tests/test_tune.py; these are its pure parts.
"""

from __future__ import annotations

import pytest


def test_question_breakdown_and_paired_test():
    from raymed.tune.questions import breakdown, question_type
    from raymed.tune.stats import mcnemar

    rows = [{"answer": "yes", "answer_type": "closed", "extra": '{"question_type": "PRES"}'},
            {"answer": "left", "answer_type": "closed", "extra": '{"question_type": "POS"}'},
            {"answer": "2", "answer_type": "open", "extra": None},
            {"answer": "ct", "answer_type": "open", "extra": '{"question_type": "MODALITY"}'}]
    assert [question_type(r) for r in rows] == ["pres", "pos", "open", "modality"]
    b = breakdown([True, False, True, True], rows)
    assert b["overall"] == 0.75 and b["types"]["pos"] == {"acc": 0.0, "n": 1} and b["types"]["pres"]["acc"] == 1.0
    # 10 questions gained, none lost: p = 2 * 0.5**10; balanced changes: p = 1; no change: p = 1.
    assert mcnemar([False] * 10 + [True] * 5, [True] * 15) == {"gained": 10, "lost": 0, "p": 2 * 0.5**10}
    assert mcnemar([True, False] * 4, [False, True] * 4)["p"] == 1.0
    assert mcnemar([True, False], [True, False]) == {"gained": 0, "lost": 0, "p": 1.0}
    assert mcnemar([False] * 6 + [True], [True] * 6 + [False])["p"] == pytest.approx(2 * 8 / 2**7)


def test_render_and_machine_of_a_document():
    from raymed.machine import describe
    from raymed.tune.questions import render

    m = describe(load=True, with_commit=True)
    assert m["cores"] >= 1 and m["cpu"] and len(m["load_average"]) == 3 and "commit" in m
    assert m["versions"]["torch"] and m["versions"]["python"]
    doc = {"analysis": "questions", "machine": m, "wall_s": 1.0, "rows": [
        {"method": "zero-shot", "lr": None, "trainable": 0, "overall": 0.5, "acc/pres": 0.5, "gained": 0, "lost": 0,
         "p": 1.0},
        {"method": "ln", "lr": 0.01, "trainable": 1234, "overall": 0.75, "acc/pres": 0.75, "gained": 1, "lost": 0,
         "p": 1.0}],
        "config": {"sweep": "s", "model": "tiny-llava-med", "style": "base", "n_images": 20, "seed": 0, "rows": 4,
                   "type_counts": {"pres": 4}}}
    text = render(doc)
    assert "pres (4)" in text and "1,234" in text and "p vs zero-shot" in text
