"""The statistics of raymed's reports: exact binomial intervals for accuracies, exact McNemar tests for paired
comparisons on the same questions. Both are scipy's (`scipy.stats.binomtest`), never hand-written formulas.

Why these (docs/scoring.md, "Uncertainty"): an accuracy is k correct answers out of n questions, so its exact
(Clopper-Pearson) interval needs only k and n, holds its 95% coverage at any n and at 0 or 100%, and is the same
every time the report is rebuilt (no resampling, no seed). Two models answering the same questions are compared
on the questions where they disagree: McNemar's exact test is the two-sided binomial test of "gained" against
"lost" with p = 1/2.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

LEVEL = 0.95

# Accuracies (per-question hits averaged, so k / n) and the counts that are their n (raymed.eval.metrics.VQA_KEYS).
# Recall and the report-generation scores are not proportions of questions: they get no interval.
ACCURACY_COUNTS: dict[str, tuple[str, ...]] = {
    "overall_acc": ("n_closed", "n_open"),
    "closed_acc": ("n_closed",),
    "open_acc": ("n_open",),
    "closed_acc@llava-med": ("n_closed",),
    "closed_acc@miss": ("n_closed@miss",),
}
_METRIC = re.compile(r"^(?P<set>.+/)(?P<name>[^/]+)$")


def proportion_ci(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a proportion of ``k`` successes in ``n`` trials."""
    from scipy.stats import binomtest

    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1 (got k={k}, n={n})")
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def successes(accuracy: float, n: int) -> int | None:
    """k of an accuracy k / n; None when ``accuracy`` is no such fraction (to its 4 significant digits, the
    precision reports store)."""
    k = round(accuracy * n)
    return k if 0 <= k <= n and abs(k / n - accuracy) <= 5e-5 else None


def accuracy_intervals(metrics: Mapping[str, Any], level: float = LEVEL) -> dict[str, list[float]]:
    """``{metric: [low, high]}`` for every accuracy in a flat metrics dict whose question count is there too
    (``eval/test/overall_acc`` with ``eval/test/n_closed`` and ``eval/test/n_open``, ...)."""
    out: dict[str, list[float]] = {}
    for key, value in metrics.items():
        m = _METRIC.match(key)
        counts = ACCURACY_COUNTS.get(m["name"]) if m else None
        if not counts or value is None or any(metrics.get(m["set"] + c) is None for c in counts):
            continue
        n = int(sum(metrics[m["set"] + c] for c in counts))
        k = successes(float(value), n) if n else None
        if k is not None:
            out[key] = list(proportion_ci(k, n, level))
    return out


def mcnemar(base: Sequence[bool | int], other: Sequence[bool | int]) -> dict[str, Any]:
    """Exact McNemar test of two sets of answers to the same questions, in the same order: ``gained`` (base wrong,
    other right), ``lost`` (base right, other wrong) and the two-sided ``p`` (1.0 when they never disagree)."""
    from scipy.stats import binomtest

    if len(base) != len(other):
        raise ValueError(f"paired answers differ in length: {len(base)} and {len(other)} questions")
    gained = sum(1 for b, o in zip(base, other) if o and not b)
    lost = sum(1 for b, o in zip(base, other) if b and not o)
    p = float(binomtest(gained, gained + lost, 0.5).pvalue) if gained + lost else 1.0
    return {"gained": gained, "lost": lost, "p": p}
