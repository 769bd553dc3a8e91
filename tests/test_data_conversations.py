"""Conversation files (LLaVA JSON, LLaMA-Factory messages): single-turn, multi-turn and text-only rows prepare, and
encode turn by turn with the loss on every assistant turn; malformed ones are named bad rows."""

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
        {"id": "two", "image": ["imgs/0.png", "imgs/0.png"], "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "gone", "image": "imgs/missing.png", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "order", "image": "imgs/0.png", "conversations": [{"from": "gpt", "value": "a"}]},
        {"id": "nolist", "image": "imgs/0.png", "conversations": "hello"},
        {"id": "late", "image": "imgs/0.png", "conversations": [
            {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "<image>\nq2"}, {"from": "gpt", "value": "a2"}]},
        {"id": "noimg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
    ]
    rows[0]["image"] = "imgs/0.png"
    (tmp_path / "conv.json").write_text(json.dumps(rows))
    with pytest.raises(BadRowsError) as err:
        prepare("llava", tmp_path / "conv.json", tmp_path / "out")
    message = str(err.value)
    assert message.startswith("6 bad row(s)")
    assert "conv.json row 1 (id 'two'): 2 images in one sample" in message
    assert "row 2 (id 'gone'): missing image: imgs/missing.png" in message
    assert "row 3 (id 'order'): malformed conversation: roles assistant" in message
    assert "row 4 (id 'nolist'): malformed conversation: 'conversations' is missing" in message
    assert "row 5 (id 'late'): malformed conversation: <image> outside the first user turn" in message
    assert "row 6 (id 'noimg'): malformed conversation: 1 <image> token(s) but no image" in message
    manifest = prepare("llava", tmp_path / "conv.json", tmp_path / "out", on_bad="skip", val_fraction=0)
    assert manifest["rows"] == 1 and manifest["rows_read"] == 7
    bad_messages = [{"messages": [{"role": "user", "content": "<image><image>q"},
                                  {"role": "assistant", "content": "a"}], "images": ["imgs/0.png"]}]
    (tmp_path / "m.jsonl").write_text(json.dumps(bad_messages[0]) + "\n")
    with pytest.raises(BadRowsError, match=r"m.jsonl row 0 \(id 'm-0'\): malformed conversation: 2 <image>"):
        prepare("messages", tmp_path / "m.jsonl", tmp_path / "out3")


def _conversations(tmp_path: Path) -> list[dict]:
    """A multi-turn LLaVA conversation and a text-only one, prepared; the rows as the stream reads them."""
    _images(tmp_path, 1)
    rows = [{"id": "multi", "image": "imgs/0.png", "conversations": [
                {"from": "human", "value": "<image>\nIs this a chest film?"}, {"from": "gpt", "value": "yes"},
                {"from": "human", "value": "Which side is abnormal?"}, {"from": "gpt", "value": "the left side"}]},
            {"id": "text", "conversations": [{"from": "human", "value": "What is a pneumothorax?"},
                                             {"from": "gpt", "value": "air in the pleural space"}]}]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    manifest = prepare("llava", tmp_path / "train.json", tmp_path / "out", val_fraction=0)
    assert manifest["rows"] == 2 and manifest["images"]["text_only"] == 1 and manifest["images"]["unique"] == 1
    return pq.read_table(tmp_path / "out" / "train").to_pylist()


def test_multi_turn_and_text_only_rows_prepare_and_encode_turn_by_turn(tmp_path: Path) -> None:
    from raymed.data.transform import DecodeAndEncode
    from raymed.models import load_processor, resolve

    multi, text = _conversations(tmp_path)
    assert (multi["question"], multi["answer"]) == ("Which side is abnormal?", "the left side")  # the scored turn
    assert json.loads(multi["extra"])["history"] == [["Is this a chest film?", "yes"]]
    assert text["image"] is None and text["image_uri"] is None and text["answer"] == "air in the pleural space"

    ref = resolve("tiny-llava")
    proc = load_processor(ref)
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids(proc.image_token)
    rows = {k: [multi[k], text[k]] for k in multi}

    def encoded(train: bool) -> dict:
        return DecodeAndEncode(lambda: lambda r: ref.family.encode(proc, r, train=train, max_length=160))(rows)

    train, gen = encoded(True), encoded(False)
    assert list(train["has_image"]) == [1, 0]
    assert (train["input_ids"][0] == image_id).sum() == ref.family.num_image_tokens(proc)
    assert (train["input_ids"][1] == image_id).sum() == 0  # text-only: no image tokens
    # The loss is on every assistant turn (both answers of the conversation) and on nothing else.
    labelled = [tok.decode([t for t in row if t != -100], skip_special_tokens=True).split() for row in train["labels"]]
    assert labelled == [["yes", "the", "left", "side"], ["air", "in", "the", "pleural", "space"]]
    # Generation sees the earlier turn (question and answer) and then the last question, with nothing after it.
    prompt = tok.decode([t for t, m in zip(gen["input_ids"][0], gen["attention_mask"][0]) if m and t != image_id])
    assert prompt.index("chest film?") < prompt.index("yes") < prompt.index("abnormal?")
    assert prompt.replace(" ", "").lower().endswith("abnormal?assistant:")  # the tiny tokenizer lowercases


def test_text_only_batches_keep_every_rank_in_the_vision_tower(tmp_path: Path) -> None:
    """A mixed batch keeps only its real images; a batch with none gets one blank image whose tokens nothing reads,
    so ZeRO-3 ranks all run the vision tower, and the loss equals the text-only forward's without any image."""
    import torch

    from raymed.data.transform import DecodeAndEncode
    from raymed.models import load_model, load_processor, resolve

    multi, text = _conversations(tmp_path)
    ref = resolve("tiny-llava")
    proc, model = load_processor(ref), load_model(ref).eval()
    encode = DecodeAndEncode(lambda: lambda r: ref.family.encode(proc, r, train=True, max_length=160))
    mixed = ref.family.cut_padding(proc, encode({k: [multi[k], text[k]] for k in multi}), train=True)
    assert "has_image" not in mixed and mixed["pixel_values"].shape[0] == 1
    only_text = encode({k: [text[k], text[k]] for k in text})
    cut = ref.family.cut_padding(proc, only_text, train=True)
    assert cut["pixel_values"].shape[0] == 1 and cut["input_ids"].shape[1] > only_text["attention_mask"].sum(1).max()

    def loss(batch: dict, images: bool) -> torch.Tensor:
        inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k not in ("id", "has_image")}
        if not images:
            inputs.pop("pixel_values")
        with torch.no_grad():
            return model(**inputs).loss

    torch.testing.assert_close(loss(cut, images=True), loss(only_text, images=False))
    for train in (True, False):  # a rank whose batch is text-only still runs the tower on the placeholder
        calls = []
        hook = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
        batch = ref.family.cut_padding(
            proc, DecodeAndEncode(lambda: lambda r: ref.family.encode(proc, r, train=train, max_length=160))(
                {k: [text[k]] for k in text}), train=train)
        inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k != "id"}
        with torch.no_grad():
            model(**inputs) if train else ref.family.generate(model, proc, inputs, max_new_tokens=2)
        hook.remove()
        assert calls, f"vision tower not run (train={train})"


@pytest.mark.integration
def test_mixed_text_only_and_image_conversations_train_under_zero3_on_two_workers(tmp_path: Path) -> None:
    """Two ZeRO-3 workers, one row per micro-batch, mostly text-only rows: on most steps one rank's batch has no
    image while the other's has one (a hang where a rank skips the vision tower), multi-turn rows included."""
    import subprocess
    import sys

    _images(tmp_path / "data", 2)
    rows = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"what is finding {i}?"},
                                               {"from": "gpt", "value": "a normal variant"}]} for i in range(6)]
    rows += [{"id": f"i{i}", "image": f"imgs/{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nis this normal?"}, {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "which side?"}, {"from": "gpt", "value": "left"}]} for i in range(2)]
    (tmp_path / "data" / "train.json").write_text(json.dumps(rows))
    (tmp_path / "data" / "test.json").write_text(json.dumps(rows[5:7]))
    manifest = prepare("llava", tmp_path / "data", tmp_path / "prepared", val_fraction=0)
    assert manifest["splits"]["train"]["rows"] == 8 and manifest["images"]["text_only"] == 7
    overrides = ["model.name=tiny-llava", f"data.path={tmp_path / 'prepared'}", "data.max_eval_rows=2",
                 "data.select_split=null",
                 "data.preprocess_actors=0", "train.epochs=1", "train.batch_size=1", "train.zero_shot=false",
                 "deepspeed.zero_stage=3", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
                 "run.metrics_export=false", f"run.storage={tmp_path / 'runs'}", "run.name=mixed"]
    result = subprocess.run(["flock", "/tmp/raymed-ray.lock", sys.executable, "-m", "raymed.train", *overrides],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "mixed" / "raymed-result.json").read_text())
    assert summary["steps"] == 4 and summary["history"][-1]["zero_stage"] == 3  # 8 rows / 2 ranks / batch 1
    assert "eval/test/overall_acc" in summary["metrics"]  # generation of a text-only and an image row, ZeRO-3
