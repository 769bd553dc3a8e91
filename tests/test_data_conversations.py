"""Conversation files (LLaVA JSON, LLaMA-Factory messages): single-turn rows prepare; the rest are named bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from raymed.data import BadRowsError, ReadOptions, prepare


def _images(root: Path, n: int) -> None:
    (root / "imgs").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / "imgs" / f"{i}.png")


def _llava(i: int, question: str, answer: str) -> dict:
    return {"id": f"s{i}", "image": f"{i}.png", "domain": {"chest_xray": True},
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def test_llava_and_messages_single_turn_prepare(tmp_path: Path) -> None:
    _images(tmp_path / "data", 3)
    rows = [_llava(0, "Is there a pneumothorax?", "No"), _llava(1, "Which lobe?", "The right upper lobe.")]
    (tmp_path / "data" / "train.json").write_text(json.dumps(rows))
    manifest = prepare("llava", tmp_path / "data" / "train.json", tmp_path / "out", val_fraction=0,
                       options=ReadOptions(image_root=tmp_path / "data" / "imgs"))
    got = pq.read_table(tmp_path / "out" / "train").to_pylist()
    assert manifest["rows"] == 2 and [r["id"] for r in got] == ["s0", "s1"]
    assert got[0]["question"] == "Is there a pneumothorax?" and got[0]["answer_type"] == "closed"
    assert got[1]["answer"] == "The right upper lobe." and got[1]["answer_type"] == "open"
    assert "chest_xray" in got[0]["extra"] and got[0]["image"] == (tmp_path / "data" / "imgs" / "0.png").read_bytes()
    messages = [{"messages": [{"role": "system", "content": "You are a radiologist."},
                              {"role": "user", "content": "<image>What organ is shown?"},
                              {"role": "assistant", "content": "the liver"}], "images": ["imgs/2.png"]}]
    (tmp_path / "data" / "test.jsonl").write_text("".join(json.dumps(m) + "\n" for m in messages))
    manifest = prepare("messages", tmp_path / "data" / "test.jsonl", tmp_path / "out2", val_fraction=0)
    got = pq.read_table(tmp_path / "out2" / "test").to_pylist()
    assert manifest["splits"]["test"]["rows"] == 1 and got[0]["question"] == "What organ is shown?"
    assert got[0]["id"] == "test-0" and got[0]["answer"] == "the liver"


def test_conversation_bad_rows_are_named(tmp_path: Path) -> None:
    _images(tmp_path, 1)
    rows = [
        _llava(0, "ok?", "yes"),
        {"id": "multi", "image": "imgs/0.png", "conversations": [
            {"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "gone", "image": "imgs/missing.png", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "order", "image": "imgs/0.png", "conversations": [{"from": "gpt", "value": "a"}]},
        {"id": "nolist", "image": "imgs/0.png", "conversations": "hello"},
    ]
    rows[0]["image"] = "imgs/0.png"
    (tmp_path / "conv.json").write_text(json.dumps(rows))
    with pytest.raises(BadRowsError) as err:
        prepare("llava", tmp_path / "conv.json", tmp_path / "out")
    message = str(err.value)
    assert message.startswith("5 bad row(s)")
    assert "conv.json row 1 (id 'multi'): multi-turn conversation (2 assistant turns)" in message
    assert "row 2 (id 'text'): text-only sample (no image)" in message
    assert "row 3 (id 'gone'): missing image: imgs/missing.png" in message
    assert "row 4 (id 'order'): malformed conversation: roles assistant" in message
    assert "row 5 (id 'nolist'): malformed conversation: 'conversations' is missing" in message
    manifest = prepare("llava", tmp_path / "conv.json", tmp_path / "out", on_bad="skip", val_fraction=0)
    assert manifest["rows"] == 1 and manifest["rows_read"] == 6
    bad_messages = [{"messages": [{"role": "user", "content": "<image><image>q"},
                                  {"role": "assistant", "content": "a"}], "images": ["imgs/0.png"]}]
    (tmp_path / "m.jsonl").write_text(json.dumps(bad_messages[0]) + "\n")
    with pytest.raises(BadRowsError, match=r"m.jsonl row 0 \(id 'm-0'\): malformed conversation: 2 <image>"):
        prepare("messages", tmp_path / "m.jsonl", tmp_path / "out3")
