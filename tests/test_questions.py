"""`python -m raymed.bench questions`: per-question-type accuracy and the paired test against zero-shot.

The suite end to end (a real sweep's checkpoints) runs in tests/test_tune.py; these are its pure parts.
"""

from __future__ import annotations

import pytest


def test_question_breakdown_and_paired_test():
    from raymed.bench.questions import breakdown, mcnemar, question_type

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
