"""Evaluation metrics: Med-VQA accuracy and token recall, report-generation scores (docs/DESIGN.md §4).

VQA answers are compared after :func:`normalize_answer`. Closed questions score exact-match accuracy;
open questions score exact-match accuracy and token recall (LLaVA-Med). Report generation uses the
reference implementations in ``pycocoevalcap`` (BLEU-1..4, ROUGE-L, METEOR, CIDEr). Its METEOR runs a
Java subprocess: when Java is missing or METEOR fails, the key ``meteor`` is left out and the reason is
logged, so evaluation never crashes on a machine without Java.
"""

from __future__ import annotations

import logging
import re
import shutil
import string
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

logger = logging.getLogger(__name__)

ARTICLES = frozenset({"a", "an", "the"})
CLOSED, OPEN = "CLOSED", "OPEN"
#: Normalised answers that make a question closed when no answer type is given (PathVQA convention).
CLOSED_ANSWERS = frozenset({"yes", "no"})
#: Keys returned by :func:`report_metrics` (``meteor`` only when Java works).
REPORT_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor", "cider")

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
# PTBTokenizer (pycocoevalcap) drops these tokens; the simple tokenizer drops all punctuation likewise.
_WORD = re.compile(r"\w+(?:(?:[-'/]|(?<=\d)\.(?=\d))\w+)*")


def normalize_answer(answer: Any) -> str:
    """Lower-case, replace punctuation by spaces, drop articles (a/an/the), collapse whitespace.

    Non-strings (answers stored as integers in real files, ``None``) are converted first.
    """
    text = "" if answer is None else str(answer)
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(tok for tok in text.split() if tok not in ARTICLES)


def normalize_answer_type(answer_type: Any, where: str = "") -> str:
    """Map a dirty answer-type value (``"closed "``, ``"Open"``) to ``CLOSED`` or ``OPEN``."""
    value = str(answer_type).strip().upper() if answer_type is not None else ""
    if value not in (CLOSED, OPEN):
        raise ValueError(f"answer type {answer_type!r}{where} is neither CLOSED nor OPEN")
    return value


def infer_answer_type(reference: Any) -> str:
    """``CLOSED`` when the normalised reference is yes/no, otherwise ``OPEN``."""
    return CLOSED if normalize_answer(reference) in CLOSED_ANSWERS else OPEN


def token_recall(prediction: Any, reference: Any) -> float:
    """Share of the reference's (normalised) tokens present in the prediction.

    The LLaVA-Med open-question recall, with tokens counted as a multiset and clipped: a reference
    ``"left left lung"`` against ``"left lung"`` scores 2/3. An empty reference scores 0.
    """
    ref = Counter(normalize_answer(reference).split())
    if not ref:
        return 0.0
    pred = Counter(normalize_answer(prediction).split())
    return sum((ref & pred).values()) / sum(ref.values())


#: Per-question keys of :func:`score_rows` and aggregate keys of :func:`vqa_metrics`, strict rule first.
VQA_KEYS = (
    "closed_acc", "open_acc", "open_recall", "overall_acc", "n_closed", "n_open",
    "closed_acc@llava-med", "open_recall@llava-med", "closed_acc@miss", "n_closed@miss",
)


def score_rows(
    preds: Sequence[Any], refs: Sequence[Any], answer_types: Sequence[Any] | None = None
) -> list[dict[str, float]]:
    """Per question, its score under every rule: one dict per row, keyed by the metric it counts towards.

    A key is present only when its rule scores that question: ``closed_acc`` (strict, CLOSED rows),
    ``open_acc`` / ``open_recall`` (strict, OPEN rows), ``overall_acc`` (strict, all rows),
    ``closed_acc@llava-med`` / ``open_recall@llava-med`` (LLaVA-Med's rule, by the row's answer type) and
    ``closed_acc@miss`` (MISS's rule, rows whose ground truth is literally yes/no). Values are 1.0/0.0 hits,
    or a recall in [0, 1]. Without ``answer_types`` the type is inferred from the reference (yes/no = closed).
    """
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references")
    if answer_types is None:
        types = [infer_answer_type(r) for r in refs]
    else:
        if len(answer_types) != len(refs):
            raise ValueError(f"got {len(answer_types)} answer types for {len(refs)} references")
        types = [normalize_answer_type(t, f" at index {i}") for i, t in enumerate(answer_types)]

    rows: list[dict[str, float]] = []
    for pred, ref, kind in zip(preds, refs, types):
        hit = float(normalize_answer(pred) == normalize_answer(ref))
        row = {"overall_acc": hit}
        if kind == CLOSED:
            row["closed_acc"] = hit
            row["closed_acc@llava-med"] = llava_med_closed_hit(pred, ref)
        else:
            row["open_acc"] = hit
            row["open_recall"] = token_recall(pred, ref)
            row["open_recall@llava-med"] = llava_med_open_recall(pred, ref)
        miss = miss_closed_hit(pred, ref)
        if miss is not None:
            row["closed_acc@miss"] = miss
        rows.append(row)
    return rows


def vqa_metrics(
    preds: Sequence[Any],
    refs: Sequence[Any],
    answer_types: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Med-VQA metrics over aligned predictions, references and answer types (CLOSED/OPEN): every rule.

    raymed's strict rule: ``closed_acc``, ``open_acc`` (exact match), ``open_recall`` (token recall),
    ``overall_acc`` (exact match over all questions), ``n_closed`` and ``n_open``. The published rules, on the
    same predictions: ``closed_acc@llava-med``, ``open_recall@llava-med``, ``closed_acc@miss`` (over the
    ``n_closed@miss`` questions MISS counts as closed). A group without questions gets 0.0. Each value is the
    mean of the per-question scores of :func:`score_rows`.
    """
    rows = score_rows(preds, refs, answer_types)
    out: dict[str, float] = {}
    for key in VQA_KEYS:
        if key.startswith("n_"):
            continue
        out[key] = _mean([r[key] for r in rows if key in r])
    out["n_closed"] = sum("closed_acc" in r for r in rows)
    out["n_open"] = sum("open_acc" in r for r in rows)
    out["n_closed@miss"] = sum("closed_acc@miss" in r for r in rows)
    return {k: out[k] for k in VQA_KEYS}


# ---- the published rules, reproduced ------------------------------------------------------------
# LLaVA-Med (microsoft/LLaVA-Med, llava/eval/): `run_eval.py::evaluate` lower-cases both answers and passes
# them through `eval_metrics/glossary.py::normalize_word`; a CLOSED answer is a hit when the prediction
# contains "yes" or "no" and contains the ground truth (both substring tests); an OPEN answer is scored by the
# `recall` of `eval_metrics/evaluate_metrics.py::calculate_f1score` (the "recall" LLaVA-Med reports for open
# questions). One deliberate difference: `run_eval.py` appends nothing for a closed answer that contains yes/no
# but not the ground truth, so such misses fall out of its denominator; `run_eval_batch.py` fixes this
# ("IMPORTANT: we are missing this line before"), and so do we: every closed question counts.
_LLAVA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_LLAVA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
# The contracted forms of the VQA evaluation toolkit's table that glossary.py uses: each is restored from any
# spelling with exactly one of its apostrophes missing ("dont" -> "don't", "couldnt've" -> "couldn't've").
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock 'ow's'at oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're
you've""".split()
_LLAVA_CONTRACTIONS = {
    form[:i] + form[i + 1:]: form for form in _CONTRACTED for i, ch in enumerate(form) if ch == "'"
}
_LLAVA_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the table maps this one backwards
_LLAVA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a look-ahead, so every "." not before a digit goes
_LLAVA_COMMA = re.compile(r"(\d)(\,)(\d)")


def llava_med_normalize(text: Any) -> str:
    """LLaVA-Med's answer normalisation (`glossary.py::normalize_word` after `.lower()`), quirks included.

    Punctuation next to a space (or any text with a digit-comma-digit) is deleted, otherwise replaced by a
    space; periods not followed by a digit are deleted (at most 32: the script passes ``re.UNICODE`` as
    ``count``); number words become digits ("two" -> "2", "none" -> "0"); articles are dropped; contractions
    written without their apostrophe get it back; commas are deleted.
    """
    token = ("" if text is None else str(text)).lower()
    out = token
    for p in _LLAVA_PUNCT:
        if p + " " in token or " " + p in token or _LLAVA_COMMA.search(token) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _LLAVA_PERIOD.sub("", out, count=int(re.UNICODE))
    words = [_LLAVA_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_LLAVA_CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


def llava_med_closed_hit(prediction: Any, reference: Any) -> float:
    """1.0 when the normalised prediction contains "yes" or "no" and contains the normalised reference
    (substring tests: "no" is found in "nodule"), as in `run_eval.py::evaluate`."""
    pred, ref = llava_med_normalize(prediction), llava_med_normalize(reference)
    return float(("yes" in pred or "no" in pred) and ref in pred)


def llava_med_open_recall(prediction: Any, reference: Any) -> float:
    """The recall of `evaluate_metrics.py::calculate_f1score` on normalised answers.

    Words are counted (split on whitespace) after normalising twice (`run_eval.py` normalises, then
    `calculate_f1score` again); true positives add the *prediction's* count of each shared word, false negatives
    the reference's count of each missing word, so "lung lung" against "left lung" scores 2/3. 0.0 when either
    side is empty or nothing is shared.
    """
    pred = Counter(llava_med_normalize(llava_med_normalize(prediction)).split())
    ref = Counter(llava_med_normalize(llava_med_normalize(reference)).split())
    if not pred or not ref:
        return 0.0
    tp = sum(n for w, n in pred.items() if w in ref)
    fn = sum(n for w, n in ref.items() if w not in pred)
    return tp / (tp + fn) if tp else 0.0


# MISS (TIMMY-CHAN/MISS, ACC.py, module-level loop with `deli`): a question counts only when its raw ground
# truth is one of "yes", "Yes", "no", "No"; it is right when the raw prediction is one of those four with the
# same meaning. No normalisation at all ("yes." or "Yes " is a miss); no open-ended scorer is published.
_MISS_YES, _MISS_NO = ("yes", "Yes"), ("no", "No")


def miss_closed_hit(prediction: Any, reference: Any) -> float | None:
    """MISS's closed score for one question: None when MISS does not count it (ground truth not yes/no)."""
    def side(text: Any) -> int | None:
        return 0 if text in _MISS_YES else 1 if text in _MISS_NO else None

    truth = side(reference) if isinstance(reference, str) else None
    if truth is None:
        return None
    return float(side(prediction) == truth if isinstance(prediction, str) else False)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def tokenize_report(text: Any) -> str:
    """Lower-case and split a report into words, dropping punctuation (a Java-free PTB approximation)."""
    return " ".join(_WORD.findall("" if text is None else str(text).lower()))


def report_metrics(
    preds: Sequence[str],
    refs: Sequence[str | Sequence[str]],
    *,
    tokenizer: Literal["simple", "ptb"] = "simple",
    meteor: bool = True,
    meteor_timeout_s: float = 600.0,
) -> dict[str, float]:
    """Corpus-level BLEU-1..4, ROUGE-L, METEOR and CIDEr (pycocoevalcap) for generated reports.

    ``refs[i]`` is one reference or a list of references for ``preds[i]``. ``tokenizer="simple"``
    lower-cases and drops punctuation in Python; ``"ptb"`` runs pycocoevalcap's Java PTBTokenizer (the
    COCO caption pipeline). CIDEr takes its document frequencies from the references, so it needs
    several samples to mean anything (one sample scores 0). METEOR starts a JVM and loads its paraphrase
    table (~10 s a call); it is left out, with a logged reason, when ``meteor`` is False, Java is missing,
    or the METEOR process fails or outlives ``meteor_timeout_s``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references")
    if not preds:
        raise ValueError("report_metrics needs at least one prediction")
    ref_lists = [[r] if isinstance(r, str) or r is None else list(r) for r in refs]
    for i, refs_i in enumerate(ref_lists):
        if not refs_i:
            raise ValueError(f"sample {i} has no reference report")

    gts, res = _tokenize(preds, ref_lists, tokenizer)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(bleu[n]) for n in range(4)}
    out["rouge_l"] = float(rouge)
    if meteor:
        score = _meteor(gts, res, meteor_timeout_s)
        if score is not None:
            out["meteor"] = score
    else:
        logger.info("METEOR skipped: disabled by the caller")
    out["cider"] = float(cider)
    return out


def _tokenize(
    preds: Sequence[str], ref_lists: list[list[str]], tokenizer: str
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    if tokenizer == "simple":
        gts = {i: [tokenize_report(r) for r in refs_i] for i, refs_i in enumerate(ref_lists)}
        res = {i: [tokenize_report(p)] for i, p in enumerate(preds)}
        return gts, res
    if tokenizer != "ptb":
        raise ValueError(f"tokenizer must be 'simple' or 'ptb', got {tokenizer!r}")
    if shutil.which("java") is None:
        raise RuntimeError("tokenizer='ptb' needs Java on PATH; install a JRE or use tokenizer='simple'")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer()
    gts = ptb.tokenize({i: [{"caption": str(r)} for r in refs_i] for i, refs_i in enumerate(ref_lists)})
    res = ptb.tokenize({i: [{"caption": str(p)}] for i, p in enumerate(preds)})
    return gts, res


_METEOR: Any = None  # one METEOR JVM per process, started at the first call and kept (a JVM start is ~10 s of CPU)


def _meteor_scorer() -> Any:
    global _METEOR
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]], timeout_s: float) -> float | None:
    """Run pycocoevalcap's METEOR on this process's METEOR JVM; None (with the reason logged) when it cannot run."""
    global _METEOR
    if shutil.which("java") is None:
        logger.warning("METEOR skipped: Java is not on PATH (pycocoevalcap's METEOR is a Java program)")
        return None
    # METEOR reads one line per request: newlines inside a report would desynchronise the protocol.
    gts = {k: [" ".join(r.split()) for r in v] for k, v in gts.items()}
    res = {k: [" ".join(r.split()) for r in v] for k, v in res.items()}
    try:
        scorer = _meteor_scorer()
    except Exception as exc:  # noqa: BLE001 - any start-up failure means "no METEOR", not a crash
        logger.warning("METEOR skipped: could not start the Java process: %s", exc)
        return None
    # A hung Java process would block readline() forever: kill it after the timeout.
    watchdog = threading.Timer(timeout_s, scorer.meteor_p.kill)
    watchdog.start()
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except Exception as exc:  # noqa: BLE001
        stderr = b""
        try:
            scorer.meteor_p.kill()
            stderr = scorer.meteor_p.stderr.read()[-500:]
        except Exception:  # noqa: BLE001
            pass
        logger.warning("METEOR skipped: the METEOR process failed (%r) %s", exc, stderr.decode(errors="replace"))
        # pycocoevalcap keeps its lock when compute_score raises; its __del__ would then block forever.
        if scorer.lock.locked():
            scorer.lock.release()
        scorer.meteor_p.wait()
        _METEOR = None  # the next call starts a fresh JVM
        return None
    finally:
        watchdog.cancel()


def row_scores(refs: Sequence[Any], preds: Sequence[Any], answer_types: Sequence[Any],
               tasks: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Per-row scores for `predictions.jsonl`: ``correct`` (strict exact match, 0/1) and the row's score under
    every rule (:func:`score_rows`). Report rows (task ``report``) get none."""
    out: list[dict[str, Any]] = []
    for i, (ref, pred, kind) in enumerate(zip(refs, preds, answer_types)):
        if tasks is not None and tasks[i] == "report":
            out.append({})
            continue
        [scores] = score_rows([pred], [ref], None if kind is None else [kind])
        out.append({"correct": int(scores["overall_acc"]), **scores})
    return out
