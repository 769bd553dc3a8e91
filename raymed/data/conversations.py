"""Conversation files: LLaVA conversation JSON (format ``llava``) and LLaMA-Factory ``messages`` (``messages``).

- ``llava``: a JSON list (or JSONL) of ``{"id", "image", "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": "..."}]}``; LLaVA-Med's instruction files add ``domain`` (kept in
  ``extra``). ``<image>`` belongs to the first human turn.
- ``messages``: ``{"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", "content":
  "..."}], "images": ["..."]}``, one ``<image>`` per entry of ``images``; a leading ``system`` message is
  dropped (counted).

Image paths are relative to ``--image-root`` (default: the file's folder). The split comes from ``--split``,
else the file name (``train.json``, ``test.jsonl``), else ``train``. The answer type is derived: closed when
the answer is yes or no, open otherwise.

A multi-turn conversation is one row: its last user turn is the ``question`` and its last assistant turn the
``answer`` (what evaluation scores), the turns before them go to ``extra`` as ``history`` ([[user, assistant],
...]); training puts the loss on every assistant turn (the family's template applied turn by turn, see
:func:`conversation_turns`). A sample with no image is a text-only row (no image bytes, no URI). A sample with
several images is a bad row naming the reason (``--on-bad skip`` writes the others and counts them), as is a
malformed conversation (not a list, roles out of order, an empty turn, an ``<image>`` count that does not match
``images``, an ``<image>`` outside the first user turn).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from raymed.data.schema import canonical_split
from raymed.data.source import ImageRef, ReadContext, SourceRow, build_row, find_image

IMAGE_TOKEN = "<image>"
_SPLIT_IN_NAME = re.compile(r"^(train|val|valid|validation|dev|test)(?![a-z])", re.I)
LLAVA_ROLES = {"human": "user", "gpt": "assistant"}


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(p for p in root.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
    if not files:
        raise FileNotFoundError(f"{root}: no .json/.jsonl conversation files found")
    return files


def _turns(record: dict[str, Any], fmt: str) -> tuple[list[tuple[str, str]], list[str]]:
    """[(role user|assistant, text)] and the problems of the record's conversation."""
    key, role_key, text_key = ("conversations", "from", "value") if fmt == "llava" else ("messages", "role", "content")
    raw = record.get(key)
    if not isinstance(raw, list) or not raw:
        return [], [f"malformed conversation: {key!r} is missing or not a non-empty list"]
    turns: list[tuple[str, str]] = []
    for k, turn in enumerate(raw):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            return [], [f"malformed conversation: turn {k} is not an object with a text {text_key!r}"]
        role = str(turn.get(role_key, ""))
        role = LLAVA_ROLES.get(role, role) if fmt == "llava" else role
        if role == "system" and k == 0:
            continue
        turns.append((role, turn[text_key]))
    expected = ["user", "assistant"] * (len(turns) // 2)
    if [r for r, _ in turns] != expected or not turns:
        roles = ", ".join(r for r, _ in turns) or "none"
        return [], [f"malformed conversation: roles {roles} (expected user/assistant pairs, user first)"]
    return turns, []


def _image_refs(record: dict[str, Any], fmt: str) -> list[Any]:
    value = record.get("image") if fmt == "llava" else record.get("images")
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list) else [value]


def _row(ctx: ReadContext, fmt: str, record: dict[str, Any], path: Path, index: int, split: str | None,
         dirs: list[Path]) -> SourceRow:
    turns, problems = _turns(record, fmt)
    images = _image_refs(record, fmt)
    tokens = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if len(images) > 1:
        problems.append(f"{len(images)} images in one sample: one image per sample is supported")
    if turns and images and tokens != len(images) and (fmt == "messages" or tokens > 1):
        problems.append(f"malformed conversation: {tokens} {IMAGE_TOKEN} token(s) for {len(images)} image(s)")
    if turns and not images and tokens:
        problems.append(f"malformed conversation: {tokens} {IMAGE_TOKEN} token(s) but no image")
    if any(IMAGE_TOKEN in text for _, text in turns[1:]):
        problems.append(f"malformed conversation: {IMAGE_TOKEN} outside the first user turn")
    pairs = [(turns[k][1].replace(IMAGE_TOKEN, "").strip(), turns[k + 1][1].strip())
             for k in range(0, len(turns) - 1, 2)]
    question, answer = pairs[-1] if pairs else (None, None)
    if len(pairs) > 1:
        ctx.norm.counts["conversation: multi-turn -> last turn scored, earlier turns in history"] += 1
    if turns and not images:
        ctx.norm.counts["conversation: text-only sample (no image)"] += 1
    fields = {k: v for k, v in record.items() if k not in ("conversations", "messages", "images", "image", "id")}
    fields.update(id=record.get("id"), question=question, answer=answer, image=images[0] if images else None)
    if len(pairs) > 1:
        fields["history"] = [list(p) for p in pairs[:-1]]
    if fmt == "messages" and images:
        ctx.norm.counts["messages: image list -> its one entry"] += 1
    row = build_row(ctx, fields, file=ctx.rel(path), index=index, split=split,
                    fields={"id": ("id",), "question": ("question",), "answer": ("answer",),
                            "image": ("image",)},
                    image=lambda ref: find_image(ref, dirs) if ref is not None else ImageRef(text_only=True),
                    default_id=f"{path.stem}-{index}", split_note="expected train, val or test")
    if problems:  # the conversation's own problems first; a malformed one has no question/answer to miss
        derived = ("missing question", "missing answer")
        row.problems = problems + [p for p in row.problems if turns or p not in derived]
    return row


def _read(ctx: ReadContext, fmt: str) -> Iterator[SourceRow]:
    from raymed.data.readers import load_records  # local: readers imports this module

    opts = ctx.options
    for path in _files(ctx.root):
        dirs = [opts.image_root] if opts.image_root else [path.parent]
        match = _SPLIT_IN_NAME.match(path.stem)
        split = canonical_split(opts.split or (match.group(1) if match else "train"))
        for index, record in enumerate(load_records(path)):
            if not isinstance(record, dict):
                yield SourceRow.invalid(ctx.rel(path), index, split, "vqa", "invalid record: not a JSON object")
                continue
            yield _row(ctx, fmt, record, path, index, split, dirs)


def conversation_turns(question: str, answer: str, extra: str | None) -> list[tuple[str, str]]:
    """A row's (user, assistant) turns in order: its ``extra`` ``history`` then its question and answer."""
    try:
        history = json.loads(extra or "{}").get("history") or []
    except (ValueError, AttributeError):
        history = []
    return [(str(q), str(a)) for q, a in history] + [(question, answer)]


def read_llava(ctx: ReadContext) -> Iterator[SourceRow]:
    """LLaVA / LLaVA-Med conversation JSON (see the module docstring)."""
    return _read(ctx, "llava")


def read_messages(ctx: ReadContext) -> Iterator[SourceRow]:
    """LLaMA-Factory ``messages`` + ``images`` (see the module docstring)."""
    return _read(ctx, "messages")
