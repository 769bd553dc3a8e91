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


def vqa_metrics(
    preds: Sequence[Any],
    refs: Sequence[Any],
    answer_types: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Med-VQA metrics over aligned predictions, references and answer types (CLOSED/OPEN).

    Returns ``closed_acc``, ``open_acc`` (exact match), ``open_recall`` (token recall), ``overall_acc``
    (exact match over all questions), ``n_closed`` and ``n_open``. A group without questions gets 0.0.
    Without ``answer_types`` the type is inferred from the reference (yes/no = closed).
    """
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references")
    if answer_types is None:
        types = [infer_answer_type(r) for r in refs]
    else:
        if len(answer_types) != len(refs):
            raise ValueError(f"got {len(answer_types)} answer types for {len(refs)} references")
        types = [normalize_answer_type(t, f" at index {i}") for i, t in enumerate(answer_types)]

    closed_hits: list[float] = []
    open_hits: list[float] = []
    open_recalls: list[float] = []
    for pred, ref, kind in zip(preds, refs, types):
        hit = float(normalize_answer(pred) == normalize_answer(ref))
        if kind == CLOSED:
            closed_hits.append(hit)
        else:
            open_hits.append(hit)
            open_recalls.append(token_recall(pred, ref))

    return {
        "closed_acc": _mean(closed_hits),
        "open_acc": _mean(open_hits),
        "open_recall": _mean(open_recalls),
        "overall_acc": _mean(closed_hits + open_hits),
        "n_closed": len(closed_hits),
        "n_open": len(open_hits),
    }


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


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]], timeout_s: float) -> float | None:
    """Run pycocoevalcap's METEOR; None (with the reason logged) when it cannot run."""
    if shutil.which("java") is None:
        logger.warning("METEOR skipped: Java is not on PATH (pycocoevalcap's METEOR is a Java program)")
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    # METEOR reads one line per request: newlines inside a report would desynchronise the protocol.
    gts = {k: [" ".join(r.split()) for r in v] for k, v in gts.items()}
    res = {k: [" ".join(r.split()) for r in v] for k, v in res.items()}
    try:
        scorer = Meteor()
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
        reason = stderr.decode(errors="replace")
        logger.warning("METEOR skipped: the METEOR process failed (%r) %s", exc, reason)
        return None
    finally:
        watchdog.cancel()
        # pycocoevalcap keeps its lock when compute_score raises; its __del__ would then block forever.
        if scorer.lock.locked():
            scorer.lock.release()
        try:
            scorer.meteor_p.stdin.close()
        except OSError:
            pass
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
