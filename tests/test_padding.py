"""Pad to the batch, not to the limit (raymed.data.padding, Family.cut_padding): the cut keeps every used column on
the padded side, and the loss and generated answers are those of the batch padded to `data.max_length`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymed.data.padding import cut_columns, token_counts, used_span
from raymed.models import load_model, load_processor, resolve
from tests.conftest import make_rows, model_inputs


def test_used_span_right_and_left_padding():
    right = np.array([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    assert used_span(right) == (0, 5)
    assert used_span(right, 4) == (0, 8)
    assert used_span(right, 16) == (0, 12)  # never past the encoded width
    left = right[:, ::-1]
    assert used_span(left) == (7, 12)
    assert used_span(left, 4) == (4, 12)
    cut = cut_columns({"attention_mask": right, "input_ids": right * 7, "pixel_values": np.zeros((2, 12))},
                      "attention_mask", ("input_ids",), 4)
    assert cut["input_ids"].shape == (2, 8) and cut["pixel_values"].shape == (2, 12)
    assert token_counts(cut) == (8, 16)


@pytest.mark.parametrize("model_name", ["tiny-llava", "tiny-miss"])
def test_cut_batch_trains_as_the_full_width(model_name):
    ref = resolve(model_name)
    proc = load_processor(ref)
    enc = ref.family.encode(proc, make_rows(3), train=True, max_length=64)
    cut = ref.family.cut_padding(proc, enc, train=True, multiple=8)
    narrower = [k for k in enc if getattr(enc[k], "ndim", 0) == 2 and cut[k].shape[1] < enc[k].shape[1]]
    assert narrower, "nothing was cut"
    assert all(cut[k].shape[1] % 8 == 0 for k in narrower)
    model = load_model(ref).eval()
    with torch.no_grad():
        full = model(**model_inputs(enc)).loss
        short = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cut.items()}).loss
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_llava_generation_answers_as_the_full_width():
    from raymed.eval import predict

    ref = resolve("tiny-llava")
    proc = load_processor(ref)
    model = load_model(ref).eval()
    rows = make_rows(2)
    rows = [{k: rows[k][i] for k in rows} | {"id": str(i), "image": _png(rows["image"][i])} for i in range(2)]
    with torch.no_grad():
        full = predict.answer_rows(model, ref.family, proc, rows, batch_size=2, max_new_tokens=3, max_length=120,
                                   pad_to_multiple_of=512)  # the whole encoded width: no cut
        cut = predict.answer_rows(model, ref.family, proc, rows, batch_size=2, max_new_tokens=3, max_length=120)
        alone = [predict.answer_rows(model, ref.family, proc, [r], batch_size=1, max_new_tokens=3, max_length=120)[0]
                 for r in rows]
    assert cut == full == alone
    enc = ref.family.encode(proc, make_rows(2), train=False, max_length=120)
    short = ref.family.cut_padding(proc, enc, train=False, multiple=8)
    assert short["input_ids"].shape[1] < 120 and (short["attention_mask"][:, 0] == 0).any()  # cut, still left-padded
