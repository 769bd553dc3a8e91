"""Normalisation of dirty source values, and the image check that catches truncated files."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from raymed.data.images import decode_image, image_problem
from raymed.data.schema import SCHEMA, Normaliser, canonical_split, clean_key, lookup

pytestmark = pytest.mark.unit


def test_schema_columns() -> None:
    assert SCHEMA.names == ["id", "dataset", "split", "task", "image", "image_uri", "question", "answer",
                            "answer_type", "extra"]
    assert [f.name for f in SCHEMA if f.nullable] == ["image", "image_uri"]


def test_text_and_ids() -> None:
    norm = Normaliser()
    assert [norm.text(v, "answer") for v in (3, 2.0, 0.5, True, " Yes ", "", None, math.nan)] == [
        "3", "2", "0.5", "yes", "Yes", None, None, None]
    assert [norm.ident(v) for v in (12, 12.0, " 12", "a1", None)] == ["12", "12", "12", "a1", None]
    assert norm.counts == {"answer: number -> str": 3, "answer: bool -> yes/no": 1, "answer: stripped whitespace": 1,
                           "id: number -> str": 2, "id: stripped whitespace": 1}


def test_categories_and_answer_types() -> None:
    norm = Normaliser()
    assert norm.category("CLOSED ", "answer_type") == "closed"
    assert norm.answer_type("CLOSED ", "yes") == "closed"
    assert norm.answer_type("Open", "left") == "open"
    assert norm.answer_type(None, "No") == "closed"  # missing: inferred from the answer
    assert norm.answer_type("other", "liver") == "open"
    assert norm.answer_type("OPEN", "yes", yes_no_closed=True) == "closed"  # PathVQA rule
    assert norm.answer_type("CLOSED", "fibrosis", yes_no_closed=True) == "open"
    assert norm.counts["answer_type: missing -> inferred"] == 1
    assert norm.counts["answer_type: 'other' -> inferred"] == 1
    assert json.loads(norm.extra({"q": 1, "organ": " HEAD", "x": math.nan, "b": b"\x00"}, {"q"}, ("organ",))) == {
        "organ": "head", "x": None}


def test_splits_and_keys() -> None:
    assert [canonical_split(v) for v in ("train", "Validate", "val ", "validation", "TEST", "holdout", None)] == [
        "train", "val", "val", "val", "test", None, None]
    assert clean_key("Image Name") == clean_key("image-name") == clean_key("IMAGE_NAME") == "image_name"
    assert lookup({"Image Name": "a.jpg"}, "img_name", "image_name") == ("Image Name", "a.jpg")
    assert lookup({"x": 1}, "y") == (None, None)


def test_truncated_jpeg_passes_verify_but_not_the_decode_check() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    whole, truncated = buffer.getvalue(), buffer.getvalue()[:2000]
    with Image.open(io.BytesIO(truncated)) as image:
        image.verify()  # the header is intact: verify() alone would accept this file
    assert image_problem(whole) is None
    assert image_problem(truncated) == "corrupt image: OSError: image file is truncated (42 bytes not processed)"
    assert image_problem(b"") == "empty image: 0 bytes"
    assert image_problem(b"not an image") == "unreadable image: not a format PIL can identify"


def test_decode_image_rgb_and_max_side() -> None:
    buffer = io.BytesIO()
    Image.new("L", (400, 200), 128).save(buffer, format="JPEG")
    full = decode_image(buffer.getvalue())
    small = decode_image(buffer.getvalue(), max_side=100)
    assert (full.mode, full.size) == ("RGB", (400, 200))
    assert (small.mode, small.size) == ("RGB", (100, 50))
