"""Synthetic Med-VQA: byte-identical per seed, every style readable by ``prepare``, and learnable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raymed.data import STYLES, ReadOptions, generate, prepare
from raymed.data.cli import main
from raymed.data.synth import ANSWER_KINDS

pytestmark = pytest.mark.unit


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main(["synth", "--out", str(tmp_path / name), "--n", "12", "--seed", "7"]) == 0
    generate(tmp_path / "c", n=12, seed=8)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b and len(a) == 12 + 3  # images + trainset.json, testset.json, synth.json
    assert a.keys() == c.keys()
    differing = [k for k in a if a[k] != c[k]]
    assert "trainset.json" in differing and sum(k.endswith(".png") for k in differing) >= 10


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_style_is_a_valid_vqa_rad_folder(style: str, tmp_path: Path) -> None:
    info = generate(tmp_path / "synth", n=20, seed=0, style=style)
    manifest = prepare("vqa-rad", tmp_path / "synth", tmp_path / "out", options=ReadOptions(dataset=f"synth-{style}"))
    assert manifest["skipped"]["count"] == 0
    # 16 train images, 2 of them (10%, rounded) carved into val with their questions; 4 test images
    per_image = STYLES[style].questions_per_image
    assert info["rows"] == {"train": 16 * per_image, "test": 4 * per_image}
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {
        "train": 14 * per_image, "val": 2 * per_image, "test": 4 * per_image}
    rows = json.loads((tmp_path / "synth" / "trainset.json").read_text())
    templates = {text: q.kind for q in STYLES[style].questions for text in q.texts}
    for row in rows:  # every question comes from the style's templates, with the kind's VQA-RAD fields
        kind = templates[row["question"]]
        assert (row["answer_type"], row["question_type"]) == ANSWER_KINDS[kind][1:]
        assert row["phrase_type"] == "freeform" and row["image_organ"] in ("HEAD", "CHEST", "ABD")
        assert Image.open(tmp_path / "synth" / "VQA_RAD Image Folder" / row["image_name"]).size == (64, 64)


def test_shifted_style_differs_from_base(tmp_path: Path) -> None:
    base = {q for q in STYLES["base"].questions for q in q.texts}
    shifted = {q for q in STYLES["shifted"].questions for q in q.texts}
    assert base - shifted and shifted - base
    generate(tmp_path / "b", n=10, seed=0, style="base")
    generate(tmp_path / "s", n=10, seed=0, style="shifted")
    pixels = [np.asarray(Image.open(tmp_path / d / "VQA_RAD Image Folder" / "synth_00000.png"), dtype=float)
              for d in ("b", "s")]
    assert np.abs(pixels[0] - pixels[1]).mean() > 5  # other contrast / noise for the same scene seed


def test_downstream_styles_against_pretraining() -> None:
    """What the shipped bases never saw: `indomain` adds only the size question, `base` also the x-ray modality."""
    def modalities(style: str) -> set[str]:
        return {m.name for m, _ in STYLES[style].modalities}

    def kinds(style: str) -> set[str]:
        return {q.kind for q in STYLES[style].questions}

    assert modalities("indomain") == modalities("pretrain") == {"ct", "mri"}
    assert modalities("base") - modalities("pretrain") == {"x-ray"}
    assert kinds("indomain") - kinds("pretrain") == kinds("base") - kinds("pretrain") == {"size"}
    assert "caption" in kinds("pretrain") and "caption" not in kinds("indomain") | kinds("base")


def test_r2gen_layout_reads_as_report_task(tmp_path: Path) -> None:
    generate(tmp_path / "r", n=10, seed=0, layout="r2gen", test_fraction=0.3)
    manifest = prepare("r2gen", tmp_path / "r", tmp_path / "out")
    # its "val" is empty: one of the 7 train studies (10%, at least one) is carved into val
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {"train": 6, "val": 1, "test": 3}
    assert manifest["splits"]["train"]["task"] == {"report": 6}
    assert manifest["val_split"]["source"] == "carved"


def _histograms(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path), dtype=np.float32)
    half = a.shape[1] // 2
    return np.concatenate([np.histogram(x, bins=24, range=(0, 256))[0] / x.size for x in (a[:, :half], a[:, half:])])


def test_closed_questions_are_learnable(tmp_path: Path) -> None:
    """Intensity histograms of each image half + logistic regression beat the majority answer clearly."""
    root = tmp_path / "synth"
    generate(root, n=400, seed=1)
    for question_type, min_gain in (("PRES", 0.1), ("POS", 0.2)):
        data = {}
        for split in ("train", "test"):
            source = json.loads((root / f"{split}set.json").read_text())
            rows = [r for r in source if r["question_type"] == question_type]
            data[split] = (np.stack([_histograms(root / "VQA_RAD Image Folder" / r["image_name"]) for r in rows]),
                           np.array([r["answer"] for r in rows]))
        (x, y), (x_test, y_test) = data["train"], data["test"]
        labels = sorted(set(y))
        mu, sd = x.mean(0), x.std(0) + 1e-6
        a, b = (x - mu) / sd, (x_test - mu) / sd
        target = (y == labels[1]).astype(float)
        w, bias = np.zeros(a.shape[1]), 0.0
        for _ in range(500):
            grad = 1 / (1 + np.exp(-(a @ w + bias))) - target
            w -= 0.1 * (a.T @ grad / len(target) + 1e-3 * w)
            bias -= 0.1 * grad.mean()
        accuracy = np.mean(np.where(b @ w + bias > 0, labels[1], labels[0]) == y_test)
        majority = max(np.mean(y_test == label) for label in labels)
        assert accuracy >= majority + min_gain, (question_type, accuracy, majority)
