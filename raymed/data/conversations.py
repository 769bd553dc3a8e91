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

Rows this version cannot train are bad rows naming the reason (``--on-bad skip`` writes the others and counts
them): a multi-turn conversation (more than one assistant turn), a sample with no image (text-only), a sample
with several images. A malformed conversation (not a list, roles out of order, an empty turn, an ``<image>``
count that does not match ``images``) is a bad row too.
"""

from __future__ import annotations

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
    if turns and len(turns) > 2:
        problems.append(f"multi-turn conversation ({len(turns) // 2} assistant turns): not supported yet")
    if turns and not images:
        problems.append("text-only sample (no image): not supported yet")
    elif len(images) > 1:
        problems.append(f"{len(images)} images in one sample: one image per sample is supported")
    if turns and images and tokens != len(images) and (fmt == "messages" or tokens > 1):
        problems.append(f"malformed conversation: {tokens} {IMAGE_TOKEN} token(s) for {len(images)} image(s)")
    question = turns[0][1].replace(IMAGE_TOKEN, "").strip() if turns else None
    answer = turns[1][1].strip() if len(turns) > 1 else None
    fields = {k: v for k, v in record.items() if k not in ("conversations", "messages", "images", "image", "id")}
    fields.update(id=record.get("id"), question=question, answer=answer, image=images[0] if images else None)
    if fmt == "messages" and images:
        ctx.norm.counts["messages: image list -> its one entry"] += 1
    row = build_row(ctx, fields, file=ctx.rel(path), index=index, split=split,
                    fields={"id": ("id",), "question": ("question",), "answer": ("answer",),
                            "image": ("image",)},
                    image=lambda ref: find_image(ref, dirs) if ref is not None else ImageRef(),
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


def read_llava(ctx: ReadContext) -> Iterator[SourceRow]:
    """LLaVA / LLaVA-Med conversation JSON (see the module docstring)."""
    return _read(ctx, "llava")


def read_messages(ctx: ReadContext) -> Iterator[SourceRow]:
    """LLaMA-Factory ``messages`` + ``images`` (see the module docstring)."""
    return _read(ctx, "messages")
