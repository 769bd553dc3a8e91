"""Readers of every supported format, on small dirty fixtures: exact rows, splits, answer types, skips."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raymed.data import ReadOptions, prepare
from raymed.data.generic import GenericColumnsError
from raymed.data.readers import DataFormatError

pytestmark = pytest.mark.unit


def jpeg(shade: int = 120, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), shade).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png(shade: int = 60, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def noisy_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


TRUNCATED = noisy_jpeg()[:2000]  # header intact, scan data cut: only a full decode notices


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in data) + "\n")
    else:
        path.write_text(json.dumps(data, indent=1))
    return path


def rows(out: Path, split: str, *keys: str) -> list[tuple]:
    """Rows of a prepared split as tuples of ``keys``, read back with plain pyarrow."""
    table = pq.read_table(out / split)
    assert table.schema.names[:10] == ["id", "dataset", "split", "task", "image", "image_uri", "question", "answer",
                                       "answer_type", "extra"]
    return [tuple(r[k] for k in keys) for r in table.to_pylist()]


def skipped(manifest: dict) -> list[tuple]:
    return [(r["file"], r["index"], r["id"], r["reason"]) for r in manifest["skipped"]["rows"]]


# --- VQA-RAD ---------------------------------------------------------------------------------------

VQA_RAD_TRAIN = [
    {"qid": 1, "image_name": "synpic1.jpg", "image_organ": "HEAD ", "answer": "Yes", "answer_type": "CLOSED ",
     "question_type": "PRES", "question": "Is there a mass? ", "phrase_type": "freeform"},
    {"qid": "2", "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": 3, "answer_type": "OPEN",
     "question_type": "COUNT", "question": "how many lesions?", "phrase_type": "para"},
    {"qid": 3, "image_name": "missing.jpg", "image_organ": "CHEST", "answer": "no", "answer_type": "CLOSED",
     "question_type": "PRES", "question": "is it normal?", "phrase_type": "freeform"},
    {"qid": 4, "image_name": "truncated.jpg", "image_organ": "ABD", "answer": "liver", "answer_type": "OPEN",
     "question_type": "ORGAN", "question": "which organ?", "phrase_type": "freeform"},
    {"qid": 5, "image_name": "synpic2.png", "image_organ": "ABD", "answer": "no", "answer_type": "CLOSED",
     "question_type": "PRES", "question": "  ", "phrase_type": "freeform"},
]
VQA_RAD_TEST = [
    {"qid": 6, "image_name": "synpic2.png", "image_organ": "ABD", "answer": "left", "answer_type": "closed",
     "question_type": "POS", "question": "which side?", "phrase_type": "test_freeform"},
]


def vqa_rad_splits(root: Path) -> Path:
    images = root / "VQA_RAD Image Folder"
    write(images / "synpic1.jpg", jpeg())
    write(images / "synpic2.png", png())
    write(images / "truncated.jpg", TRUNCATED)
    write(root / "trainset.json", VQA_RAD_TRAIN)
    write(root / "testset.json", VQA_RAD_TEST)
    return root


def test_vqa_rad_split_files_dirty_rows_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = prepare("vqa-rad", vqa_rad_splits(tmp_path / "vqa"), out, on_bad="skip")
    assert rows(out, "train", "id", "split", "question", "answer", "answer_type", "task", "dataset") == [
        ("1", "train", "Is there a mass?", "Yes", "closed", "vqa", "vqa-rad"),
        ("2", "train", "how many lesions?", "3", "open", "vqa", "vqa-rad"),
    ]
    assert rows(out, "test", "id", "answer", "answer_type") == [("6", "left", "closed")]
    first = pq.read_table(out / "train").to_pylist()[0]
    assert first["image"] == jpeg() and first["image_uri"] is None  # the file bytes exactly as stored
    assert json.loads(first["extra"]) == {"image_name": "synpic1.jpg", "image_organ": "head", "question_type": "pres",
                                          "phrase_type": "freeform"}
    assert skipped(manifest) == [
        ("trainset.json", 2, "3", "missing image: VQA_RAD Image Folder/missing.jpg"),
        ("trainset.json", 3, "4", "corrupt image: OSError: image file is truncated "
                                  "(42 bytes not processed): VQA_RAD Image Folder/truncated.jpg"),
        ("trainset.json", 4, "5", "missing question"),
    ]
    assert manifest["skipped"]["by_reason"] == {"corrupt image": 1, "missing image": 1, "missing question": 1}
    assert manifest["splits"]["train"]["answer_type"] == {"closed": 1, "open": 1}
    assert manifest["splits"]["train"]["images"] == 1 and manifest["images"]["unique"] == 2
    assert manifest["rows_read"] == 6 and manifest["rows"] == 3
    assert manifest["normalised"]["answer: number -> str"] == 1
    assert manifest["normalised"]["answer_type: stripped whitespace"] == 1


def test_vqa_rad_public_json_split_from_phrase_type(tmp_path: Path) -> None:
    root = tmp_path / "vqa"
    write(root / "images" / "a.jpg", jpeg())
    base = {"image_name": "a.jpg", "answer": "yes", "answer_type": "CLOSED", "question": "q?", "image_organ": "HEAD",
            "qid_linked_id": "x", "evaluation": "given"}
    phrases = ["freeform", "para", "test_freeform", "test_para", "FREEFORM ", "frame"]
    write(root / "VQA_RAD Dataset Public.json", [{**base, "qid": i, "phrase_type": p} for i, p in enumerate(phrases)])
    out = tmp_path / "out"
    manifest = prepare("vqa-rad", root, out, on_bad="skip")
    assert rows(out, "train", "id") == [("0",), ("1",), ("4",)]
    assert rows(out, "test", "id") == [("2",), ("3",)]
    assert skipped(manifest) == [("VQA_RAD Dataset Public.json", 5, "5", "unknown split: phrase_type 'frame' "
                                  "(expected one of freeform, para, test_freeform, test_para)")]


def test_vqa_rad_without_annotations_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="trainset.json/testset.json or 'VQA_RAD Dataset Public.json'"):
        prepare("vqa-rad", tmp_path / "empty", tmp_path / "out")


# --- SLAKE -----------------------------------------------------------------------------------------


def slake(root: Path) -> Path:
    write(root / "imgs" / "xmlab0" / "source.jpg", jpeg(90))
    write(root / "imgs" / "xmlab1" / "source.jpg", jpeg(30))
    common = {"location": "Lung ", "modality": "CT", "content_type": "Organ", "base_type": "vqa", "triple": ["a", "b"]}
    write(root / "train.json", [
        {**common, "img_id": 0, "img_name": "xmlab0/source.jpg", "question": "Which organ?", "answer": "Lung",
         "q_lang": "en", "answer_type": "OPEN", "qid": 0},
        {**common, "img_id": 0, "img_name": "xmlab0/source.jpg", "question": "哪个器官?", "answer": "肺",
         "q_lang": "zh", "answer_type": "OPEN", "qid": 1},
        {**common, "img_id": 0, "img_name": "xmlab0/source.jpg", "question": "How many kidneys?", "answer": 2,
         "q_lang": "en ", "answer_type": "OPEN", "qid": 2},
    ])
    write(root / "validate.json", [{**common, "img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Is it CT?",
                                    "answer": "Yes", "q_lang": "en", "answer_type": "CLOSED", "qid": 3}])
    write(root / "test.json", [{**common, "img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Normal?",
                                "answer": None, "q_lang": "en", "answer_type": "CLOSED", "qid": 4}])
    return root


def test_slake_english_by_default(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = prepare("slake", slake(tmp_path / "slake"), out, on_bad="skip")
    assert rows(out, "train", "id", "question", "answer", "answer_type") == [
        ("0", "Which organ?", "Lung", "open"), ("2", "How many kidneys?", "2", "open")]
    assert rows(out, "val", "id", "split", "answer_type") == [("3", "val", "closed")]
    assert manifest["val_split"] == {"source": "dataset"}  # validate.json is SLAKE's own: nothing carved
    assert "test" not in manifest["splits"]
    assert skipped(manifest) == [("test.json", 0, "4", "missing answer")]
    assert manifest["filtered"] == {"q_lang=zh (--lang en)": 1}
    extra = json.loads(pq.read_table(out / "train").to_pylist()[0]["extra"])
    assert extra == {"img_id": 0, "img_name": "xmlab0/source.jpg", "location": "lung", "modality": "ct",
                     "content_type": "organ", "base_type": "vqa", "triple": ["a", "b"], "q_lang": "en"}


def test_slake_both_languages(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare("slake", slake(tmp_path / "slake"), out, on_bad="skip", options=ReadOptions(lang="all"))
    assert rows(out, "train", "id", "answer") == [("0", "Lung"), ("1", "肺"), ("2", "2")]


# --- PathVQA ---------------------------------------------------------------------------------------


def test_pathvqa_jsonl_and_json_yes_no_closed(tmp_path: Path) -> None:
    root = tmp_path / "pvqa"
    write(root / "images" / "train" / "train_0001.jpg", jpeg())
    write(root / "images" / "test_0001.png", png())
    write(root / "train.jsonl", [
        {"image": "train_0001", "question": "Is fibrosis present?", "answer": "Yes", "answer_type": "OPEN"},
        {"image": "train_0001.jpg", "question": "What is shown?", "answer": "fibrosis", "answer_type": "CLOSED"},
        "{not json",
        {"id": "p9", "image": "train_0002", "question": "Where?", "answer": "lung"},
    ])
    write(root / "test.json", [{"id": 7, "image": "test_0001.png", "question": "Is this normal?", "answer": "no"}])
    out = tmp_path / "out"
    manifest = prepare("pathvqa", root, out, on_bad="skip")
    assert rows(out, "train", "id", "answer", "answer_type") == [("train-0", "Yes", "closed"),
                                                                 ("train-1", "fibrosis", "open")]
    assert rows(out, "test", "id", "answer_type", "dataset") == [("7", "closed", "pathvqa")]
    assert skipped(manifest) == [
        ("train.jsonl", 2, None, "invalid record: not valid JSON"),
        ("train.jsonl", 3, "p9", "missing image: images/train/train_0002"),
    ]


# --- R2Gen (IU-Xray / MIMIC-CXR) -------------------------------------------------------------------


def r2gen(root: Path) -> Path:
    for study in ("CXR1_1", "CXR2_1", "CXR3_1"):
        write(root / "images" / study / "0.png", png(10))
        write(root / "images" / study / "1.png", png(20))
    write(root / "annotation.json", {
        "train": [{"id": "CXR1_1", "report": "The lungs are clear. ", "image_path": ["CXR1_1/0.png", "CXR1_1/1.png"],
                   "split": "train"},
                  {"id": "CXR2_1", "report": "No effusion.", "image_path": ["CXR2_1/0.png", "CXR2_1/1.png"],
                   "split": "train"}],
        "val": [{"id": "CXR3_1", "report": "Normal heart.", "image_path": ["CXR3_1/0.png"], "split": "val"}],
        "test": [{"id": "CXR4_1", "report": "", "image_path": ["CXR4_1/0.png"], "split": "test"}],
    })
    return root


def test_r2gen_first_view_by_default(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = prepare("r2gen", r2gen(tmp_path / "iu"), out, on_bad="skip", options=ReadOptions(dataset="iu-xray"))
    assert rows(out, "train", "id", "task", "question", "answer", "answer_type", "dataset") == [
        ("CXR1_1", "report", "", "The lungs are clear.", "open", "iu-xray"),
        ("CXR2_1", "report", "", "No effusion.", "open", "iu-xray")]
    first = pq.read_table(out / "train").to_pylist()[0]
    assert first["image"] == png(10)
    assert json.loads(first["extra"]) == {"image_path": "CXR1_1/0.png", "split": "train",
                                          "views": ["CXR1_1/0.png", "CXR1_1/1.png"]}
    assert rows(out, "val", "id") == [("CXR3_1",)]
    assert manifest["val_split"] == {"source": "dataset"}
    assert skipped(manifest) == [
        ("annotation.json:test", 0, "CXR4_1", "missing report text; missing image: images/CXR4_1/0.png")]
    assert manifest["splits"]["train"]["task"] == {"report": 2}


def test_r2gen_all_views(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare("r2gen", r2gen(tmp_path / "iu"), out, on_bad="skip", options=ReadOptions(views="all"))
    assert rows(out, "train", "id") == [("CXR1_1/0",), ("CXR1_1/1",), ("CXR2_1/0",), ("CXR2_1/1",)]
    assert [r["image"] for r in pq.read_table(out / "train").to_pylist()][:2] == [png(10), png(20)]


# --- generic ---------------------------------------------------------------------------------------


def test_generic_jsonl_with_custom_columns(tmp_path: Path) -> None:
    root = tmp_path / "gen"
    write(root / "pics" / "a.jpg", jpeg())
    write(root / "data.jsonl", [
        {"key": 10, "img": "pics/a.jpg", "q": "Is it red?", "a": "No", "kind": "CLOSED", "part": "train"},
        {"key": 11, "img": "pics/a.jpg", "q": "Color?", "a": "gray", "part": "Validation"},
        {"key": 12, "img": "s3://bucket/x.jpg", "q": "Remote?", "a": "yes", "part": "test"},
        {"key": 13, "img": "pics/a.jpg", "q": "Where?", "a": "here", "part": "holdout"},
    ])
    cols = {"id": "key", "image": "img", "question": "q", "answer": "a", "answer_type": "kind", "split": "part"}
    out = tmp_path / "out"
    manifest = prepare("generic", root, out, on_bad="skip", options=ReadOptions(columns=cols))
    assert rows(out, "train", "id", "answer_type", "extra") == [("10", "closed", '{"img": "pics/a.jpg"}')]
    assert rows(out, "val", "id", "answer_type") == [("11", "open")]
    assert rows(out, "test", "id", "image", "image_uri") == [("12", None, "s3://bucket/x.jpg")]
    assert skipped(manifest) == [("data.jsonl", 3, "13", "unknown split: 'holdout' (expected train, val or test)")]
    assert manifest["images"]["remote_unchecked"] == 1


def test_generic_csv_paths_and_report_task(tmp_path: Path) -> None:
    root = tmp_path / "gen"
    write(root / "a.png", png())
    (root / "test.csv").write_text("id,image_path,report\nr1,a.png,Clear lungs.\nr2,b.png,Effusion.\n")
    out = tmp_path / "out"
    manifest = prepare("generic", root / "test.csv", out, on_bad="skip", options=ReadOptions(task="report"),
                       images="uri")
    assert rows(out, "test", "id", "task", "answer", "image") == [("r1", "report", "Clear lungs.", None)]
    assert rows(out, "test", "image_uri") == [(str((root / "a.png").resolve()),)]
    assert skipped(manifest) == [("test.csv", 1, "r2", "missing image: b.png")]


def test_generic_parquet_with_image_bytes(tmp_path: Path) -> None:
    root = tmp_path / "gen"
    root.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": jpeg(), "path": "x.jpg"}, {"bytes": TRUNCATED, "path": "t.jpg"},
                           {"bytes": b"not an image", "path": None}], type=image_type),
        "question": ["Is it gray?", "Broken?", "Junk?"],
        "answer": ["yes", "no", "maybe"],
    })
    pq.write_table(table, root / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    manifest = prepare("generic", root, out, on_bad="skip")
    assert rows(out, "train", "id", "question", "image") == [("train-00000-of-00001-0", "Is it gray?", jpeg())]
    reasons = [r[3] for r in skipped(manifest)]
    assert reasons[0].startswith("corrupt image: OSError: image file is truncated") and reasons[0].endswith("t.jpg")
    assert reasons[1] == "unreadable image: not a format PIL can identify: <embedded>"


def test_generic_unknown_column_is_named(tmp_path: Path) -> None:
    write(tmp_path / "gen" / "a.csv", b"question,answer,image\nq,a,x.png\n")
    with pytest.raises(GenericColumnsError, match=r"--columns question=query: no such column; columns are: "
                                                  r"question, answer, image"):
        prepare("generic", tmp_path / "gen", tmp_path / "out", options=ReadOptions(columns={"question": "query"}))
    with pytest.raises(GenericColumnsError, match="unknown field.*prompt"):
        prepare("generic", tmp_path / "gen", tmp_path / "out", options=ReadOptions(columns={"prompt": "question"}))
