"""raymed.tune.stats: exact intervals and McNemar tests against values checked by hand and by independent formulas."""

from __future__ import annotations

import math

import pytest

from raymed.tune.stats import accuracy_intervals, mcnemar, proportion_ci, successes

pytestmark = pytest.mark.unit


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed term by term (independent of scipy)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_clopper_pearson_at_the_edges_and_by_its_definition() -> None:
    # 0 of n: [0, 1 - (alpha/2)^(1/n)]; n of n: [(alpha/2)^(1/n), 1] (closed forms of the exact interval).
    assert proportion_ci(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)), abs=1e-12)
    assert proportion_ci(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0), abs=1e-12)
    # In between, the bounds are where the binomial tails equal alpha/2: P(X >= k | low) = P(X <= k | high) = 0.025.
    low, high = proportion_ci(7, 20)
    assert 1 - _binomial_tail(6, 20, low) == pytest.approx(0.025, abs=1e-9)
    assert _binomial_tail(7, 20, high) == pytest.approx(0.025, abs=1e-9)
    assert low < 7 / 20 < high
    wider = proportion_ci(7, 20, level=0.99)
    assert wider[0] < low and wider[1] > high
    with pytest.raises(ValueError, match="0 <= k <= n"):
        proportion_ci(3, 2)


def test_accuracy_intervals_find_each_accuracys_question_count() -> None:
    metrics = {"eval/test/overall_acc": 0.6, "eval/test/n_closed": 6, "eval/test/n_open": 4,
               "eval/test/closed_acc": 0.6667, "eval/test/open_acc": 0.5, "eval/test/open_recall": 0.61,
               "eval/test/closed_acc@miss": 0.8, "zeroshot/ood/overall_acc": 0.25}  # no counts for ood
    got = accuracy_intervals(metrics)
    assert set(got) == {"eval/test/overall_acc", "eval/test/closed_acc", "eval/test/open_acc"}
    assert got["eval/test/overall_acc"] == list(proportion_ci(6, 10))
    assert got["eval/test/closed_acc"] == list(proportion_ci(4, 6))  # 0.6667 is 4/6 to 4 significant digits
    assert got["eval/test/open_acc"] == list(proportion_ci(2, 4))
    assert successes(0.6667, 6) == 4 and successes(0.61, 6) is None  # 0.61 is no k/6


def test_mcnemar_counts_and_exact_p() -> None:
    # 3 gained, 1 lost: p = 2 * P(X <= 1 | n=4, 1/2) = 2 * 5/16, by hand.
    base = [0, 0, 0, 1, 1, 0]
    other = [1, 1, 1, 0, 1, 0]
    assert mcnemar(base, other) == {"gained": 3, "lost": 1, "p": 0.625}
    assert mcnemar(other, base) == {"gained": 1, "lost": 3, "p": 0.625}
    # 12 gained, 2 lost: against the two-sided tail of the binomial summed by hand.
    big = mcnemar([0] * 12 + [1] * 2 + [1] * 30, [1] * 12 + [0] * 2 + [1] * 30)
    assert (big["gained"], big["lost"]) == (12, 2)
    assert big["p"] == pytest.approx(2 * _binomial_tail(2, 14, 0.5), rel=1e-12)
    assert mcnemar([1, 0], [1, 0]) == {"gained": 0, "lost": 0, "p": 1.0}
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar([1], [1, 0])
