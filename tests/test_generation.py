"""Batched LLaVA generation (left-padded prompts, `train.eval_batch_size` at a time) answers exactly as one prompt at
a time does, the way LLaVA-Med's `model_vqa.py` generates: on the tiny preset and on a converted LLaVA-Med v1.5
(its `[INST]` template, padded images), questions of different lengths so that the padding differs per row."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raymed.models import load_model, load_processor, resolve
from raymed.models.llava_convert import convert_llava_med
from raymed.eval.predict import answer_rows
from tests.fixtures.llava_release import write_llava_med_v15

QUESTIONS = ["is there a lesion?", "which organ is shown in this axial slice of the abdomen?", "size?",
             "is the heart enlarged compared with the previous study of this patient?", "where?"]


def rows(n: int) -> list[dict]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        mode = "L" if i % 2 else "RGB"  # grayscale scans and colour images, wide and tall
        shape = (24 + 8 * (i % 3), 32) if mode == "L" else (32, 20 + 6 * (i % 3), 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buffer, format="PNG")
        out.append({"id": str(i), "image": buffer.getvalue(), "question": QUESTIONS[i % len(QUESTIONS)],
                    "answer": "yes", "task": "vqa", "answer_type": "closed"})
    return out


@pytest.fixture(scope="module")
def llava_med(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("gen")
    return str(convert_llava_med(write_llava_med_v15(root / "orig"), root / "hf")["out"])


@pytest.mark.parametrize("which", ["tiny-llava", "llava-med-v1.5"])
def test_batched_generation_answers_as_one_prompt_at_a_time(which, llava_med):
    ref = resolve("tiny-llava" if which == "tiny-llava" else llava_med)
    model, processor = load_model(ref).eval(), load_processor(ref)
    data = rows(7)
    kwargs = {"max_new_tokens": 8, "max_length": 192, "image_aspect": "pad"}
    single = answer_rows(model, ref.family, processor, data, batch_size=1, **kwargs)
    batched = answer_rows(model, ref.family, processor, data, batch_size=3, **kwargs)
    assert len(single) == 7 and any(single), single
    assert batched == single
