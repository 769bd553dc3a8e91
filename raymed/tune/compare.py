"""Which trial stands for each method in a sweep, and how the chosen trials compare (`raymed.tune.report` writes both).

A method's trial is chosen on the selection metric (``eval/val/...``: the sweep's own) and never on the split it is
scored on (``data.eval_split``, ``test``), so the scores reported for it are not biased by the choice; a trial that
errored is never chosen. The chosen trials are compared with their base model's zero-shot answers and with the
chosen `ln` trial (the paper's method) by exact McNemar tests on the same scored questions (`raymed.tune.stats`), from
the per-question correctness every result row carries (`raymed.tune.results.answers`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from raymed.tune.stats import mcnemar

STATUSES = ("completed", "stopped", "errored")
REFERENCE_METHOD = "ln"
METRIC_RE = re.compile(r"^(?P<kind>[^/]+)/(?P<set>[^/]+)/(?P<name>.+)$")


def status(row: Mapping[str, Any]) -> str:
    """``errored`` (the run failed), ``stopped`` (the scheduler stopped it early) or ``completed``."""
    if row.get("error"):
        return "errored"
    return "stopped" if row.get("stopped_early") else "completed"


def rank(trials: Sequence[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Trials best first by ``metric``, errored and unscored ones last; sets each trial's ``rank`` (None for those)."""
    sign = 1.0 if mode == "max" else -1.0

    def key(t: Mapping[str, Any]) -> tuple[bool, bool, float, str]:
        value = t["metrics"].get(metric)
        return (t["status"] == "errored", value is None, -sign * value if value is not None else 0.0, t["trial_id"])

    ranked = sorted(trials, key=key)
    place = 0
    for t in ranked:
        scored = t["status"] != "errored" and t["metrics"].get(metric) is not None
        place += scored
        t["rank"] = place if scored else None
    return ranked


def towers(t: Mapping[str, Any]) -> str:
    return "+".join(t["towers"]) if t.get("towers") else "default"


def labels(trials: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Label per trial: the method, plus its towers when the method ran with several tower choices, prefixed
    by the base model when the sweep compared several models."""
    choices: dict[str, set[str]] = {}
    for t in trials:
        choices.setdefault(t["method"], set()).add(towers(t))
    several_models = len({t.get("model") for t in trials}) > 1
    out = {}
    for t in trials:
        label = t["method"] if len(choices[t["method"]]) == 1 else f"{t['method']} [{towers(t)}]"
        out[t["trial_id"]] = f"{t.get('model')} · {label}" if several_models else label
    return out


def chosen(ranked: Sequence[dict[str, Any]], names: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each label's chosen trial: its best-ranked trial that did not error (a label whose every trial errored has
    none)."""
    best: dict[str, dict[str, Any]] = {}
    for t in ranked:
        if t["status"] != "errored":
            best.setdefault(names[t["trial_id"]], t)
    return best


def reported_split(trials: Sequence[Mapping[str, Any]]) -> str:
    """The split the trials are scored on: their `data.eval_split` (``test`` for rows without a config)."""
    splits = Counter(((t.get("config") or {}).get("data") or {}).get("eval_split", "test") for t in trials)
    return splits.most_common(1)[0][0]


def reported_metric(metric: str, split: str) -> str:
    """The selection metric's counterpart on the reported split (``eval/val/x`` -> ``eval/test/x``); the metric itself
    when it is not an eval metric."""
    m = METRIC_RE.match(metric)
    return f"eval/{split}/{m['name']}" if m and m["kind"] == "eval" else metric


def paired(a: Mapping[str, Any], a_key: str, b: Mapping[str, Any], b_key: str) -> dict[str, Any] | None:
    """McNemar test of ``a``'s answers (``answers[a_key]``) against the reference ``b``'s on the same questions:
    ``gained`` are questions ``a`` gets right and ``b`` wrong. None when either lacks them or the questions differ."""
    mine, theirs = (a.get("answers") or {}).get(a_key), (b.get("answers") or {}).get(b_key)
    if not mine or not theirs or mine["ids"] != theirs["ids"]:
        return None
    base, other = [c == "1" for c in theirs["correct"]], [c == "1" for c in mine["correct"]]
    return {**mcnemar(base, other), "n": len(other)}


def comparisons(best: Mapping[str, Mapping[str, Any]], ranked: Sequence[Mapping[str, Any]],
                split: str) -> dict[str, dict[str, Any]]:
    """Per label, its chosen trial against its zero-shot answers and against the chosen `ln` trial of the same base
    model, on the ``split`` questions: ``{"zero-shot": test | None, "ln": test | None, "ln_trial": id | None}``."""
    key = f"eval/{split}"
    out = {}
    for label, t in best.items():
        ref = next((r for r in ranked if r["method"] == REFERENCE_METHOD and r["status"] != "errored"
                    and r.get("model") == t.get("model")), None)
        vs_ln = paired(t, key, ref, key) if ref is not None and ref["trial_id"] != t["trial_id"] else None
        out[label] = {"zero-shot": paired(t, key, t, f"zeroshot/{split}"), REFERENCE_METHOD: vs_ln,
                      f"{REFERENCE_METHOD}_trial": ref["trial_id"] if vs_ln else None}
    return out
