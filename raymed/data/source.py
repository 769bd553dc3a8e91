"""What a reader yields: one source row with its provenance, before its image is checked.

Readers only parse and normalise; they never raise on a dirty row. A row that cannot be used
carries ``problems`` (human-readable reasons), and ``prepare`` decides (``--on-bad``) whether
that stops the run or is skipped and recorded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from raymed.data.images import is_remote_uri, uri_to_path
from raymed.data.schema import Normaliser, lookup


@dataclass(frozen=True)
class ReadOptions:
    """Reader options; each format uses the ones its registry entry lists (see ``FORMATS``)."""

    dataset: str | None = None
    """Value of the ``dataset`` column; defaults to the format's dataset name."""
    image_root: Path | None = None
    """Directory that image paths are relative to; defaults to the format's usual folder."""
    lang: str = "en"
    """SLAKE: ``en`` (default), ``zh`` or ``all``."""
    views: str = "first"
    """R2Gen: ``first`` view per study (default) or ``all`` (one row per view, id ``{id}/{k}``)."""
    source: str = "auto"
    """VQA-RAD: ``splits`` (trainset/testset.json), ``public`` (the release JSON) or ``auto``."""
    columns: Mapping[str, str] = field(default_factory=dict)
    """Generic: unified field -> source column, e.g. ``{"question": "q", "image": "img"}``."""
    split: str | None = None
    """Generic: split for rows without a split column (default: from the file name, else train)."""
    task: str = "vqa"
    """Generic: task for rows without a task column."""
    dicom_window: tuple[float, float] | None = None
    """DICOM images: (center, width) instead of each file's own window (see :mod:`raymed.data.dicom`)."""


@dataclass
class ImageRef:
    """Where a row's image comes from: a local file, embedded bytes, or a remote URI."""

    ref: str | None = None
    """The reference as written in the source (for messages)."""
    path: Path | None = None
    data: bytes | None = None
    uri: str | None = None
    problem: str | None = None
    text_only: bool = False
    """A sample that has no image on purpose (a text-only conversation turn), not a missing one."""


@dataclass
class SourceRow:
    """One source row, normalised, with where it came from (file and 0-based row index)."""

    file: str
    index: int
    id: str | None
    split: str | None
    task: str
    question: str
    answer: str
    answer_type: str
    extra: str
    image: ImageRef
    problems: list[str] = field(default_factory=list)

    @classmethod
    def invalid(cls, file: str, index: int, split: str | None, task: str, problem: str) -> SourceRow:
        """A record that is not even an object (bad JSON line, a list...): only its problem is known."""
        return cls(file, index, None, split, task, "", "", "open", "{}", ImageRef(), [problem])

    def where(self) -> str:
        """``file row N (id 'x')``: how messages name this row."""
        ident = f" (id {self.id!r})" if self.id is not None else ""
        return f"{self.file} row {self.index}{ident}"


@dataclass
class ReadContext:
    """Shared state of one read: options, the normaliser's counters, and rows filtered on purpose."""

    root: Path
    options: ReadOptions = field(default_factory=ReadOptions)
    norm: Normaliser = field(default_factory=Normaliser)
    filtered: Counter[str] = field(default_factory=Counter)

    def rel(self, path: Path) -> str:
        """``path`` relative to the input root when possible (shorter messages)."""
        base = self.root.parent if self.root.is_file() else self.root
        try:
            return str(path.relative_to(base))
        except ValueError:
            return str(path)


FieldNames = Mapping[str, tuple[str, ...]]

VQA_FIELDS: FieldNames = {
    "id": ("qid", "id", "question_id"),
    "question": ("question",),
    "answer": ("answer",),
    "answer_type": ("answer_type",),
    "image": ("image_name", "img_name", "image", "image_path", "img", "image_id"),
}

IMAGE_SUFFIXES = ("", ".jpg", ".jpeg", ".png")


def find_image(ref: Any, dirs: Iterable[Path], suffixes: tuple[str, ...] = ("",)) -> ImageRef:
    """Resolve a path-like image reference against ``dirs`` (first existing file wins).

    Absolute paths and ``file://`` URIs are used as is; remote URIs are kept as URIs. A reference
    that exists nowhere still gets a path (the first candidate), so the checker reports it missing.
    """
    if ref is None or (isinstance(ref, str) and not ref.strip()):
        return ImageRef(problem="missing image: no image reference in the row")
    text = str(ref).strip()
    if is_remote_uri(text):
        return ImageRef(ref=text, uri=text)
    rel = uri_to_path(text)
    candidates = [rel] if rel.is_absolute() else [d / rel for d in dirs]
    for candidate in candidates:
        for suffix in suffixes:
            path = candidate.with_name(candidate.name + suffix) if suffix else candidate
            if path.is_file():
                return ImageRef(ref=text, path=path)
    return ImageRef(ref=text, path=candidates[0] if candidates else rel)


def build_row(
    ctx: ReadContext,
    record: Mapping[str, Any],
    *,
    file: str,
    index: int,
    split: str | None,
    image: Callable[[Any], ImageRef],
    fields: FieldNames = VQA_FIELDS,
    task: str = "vqa",
    categorical: tuple[str, ...] = (),
    yes_no_closed: bool = False,
    default_id: str | None = None,
    split_note: str = "expected train, val or test",
) -> SourceRow:
    """Map one source record to a :class:`SourceRow`: normalise values, collect problems, keep extras.

    ``fields`` lists the accepted spellings of each unified field; the first present wins. Fields not
    mapped go to ``extra`` (``categorical`` ones normalised). ``image`` resolves the raw image value;
    ``split_note`` says why ``split`` is None, for the row's problem.
    """
    record = dict(record)
    used: set[str] = set()

    def get(name: str) -> Any:
        key, value = lookup(record, *fields.get(name, ()))
        if key is not None:
            used.add(key)
        return value

    norm = ctx.norm
    row_id = norm.ident(get("id"))
    if row_id is None and default_id is not None:
        norm.counts["id: missing -> generated from file and row"] += 1
        row_id = default_id
    problems: list[str] = []
    if row_id is None:
        problems.append("missing id")
    if task == "report":
        question = ""
        answer = norm.text(get("answer"), "report")
        if answer is None:
            problems.append("missing report text")
        answer_type = "open"
    else:
        question = norm.text(get("question"), "question")
        answer = norm.text(get("answer"), "answer")
        if question is None:
            problems.append("missing question")
        if answer is None:
            problems.append("missing answer")
        answer_type = norm.answer_type(get("answer_type"), answer, yes_no_closed=yes_no_closed)
    if split is None:
        problems.append(f"unknown split: {split_note}")
    image_key, raw_image = lookup(record, *fields.get("image", ()))
    ref = image(raw_image)  # the image reference itself stays in extra (provenance)
    return SourceRow(
        file=file,
        index=index,
        id=row_id,
        split=split,
        task=task,
        question=question or "",
        answer=answer or "",
        answer_type=answer_type,
        extra=norm.extra(record, used, categorical),
        image=ref,
        problems=problems,
    )
