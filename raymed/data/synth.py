"""Synthetic Med-VQA: deterministic, learnable, in the VQA-RAD (or R2Gen) layout.

Each image is a procedurally drawn grayscale "scan": a field of view, an organ outline and 0-3
lesions, all on one side of the image, small or large. Questions ask what the image shows:
closed (is there a lesion? left or right? large or small?) and open (which organ, how many lesions,
what modality, describe the image). Everything a question asks is visible, so a tiny model can learn it.

A :class:`Style` is data: modalities (how intensities, noise and blur render), organs, the lesion
count distribution and the question templates with weights. ``base`` is the default training set,
``shifted`` an out-of-distribution variant (other contrast, noise and phrasing, one unseen organ),
``pretrain`` a caption-heavy ct/mri mix for pretraining tiny bases (it holds out the x-ray modality and the size
question that ``base`` adds), ``indomain`` the ``base`` questions on ``pretrain``'s modalities only (the size
question is new). Output is byte-identical per seed: one seeded ``numpy`` generator per image, fixed PNG
encoder settings, no timestamps.

"Left"/"right" mean the image's left and right halves (not the patient's side).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class Modality:
    """How a modality renders: 0-255 intensities, additive/multiplicative noise, blur radius."""

    name: str
    background: int
    body: int
    organ: int
    outline: int
    lesion: int
    noise: float = 6.0
    speckle: float = 0.0
    blur: float = 0.0


@dataclass(frozen=True)
class Organ:
    """An organ: its answer, its VQA-RAD ``image_organ`` region and the shape drawn (see SHAPES)."""

    name: str
    region: str
    shape: str


@dataclass(frozen=True)
class Question:
    """A question kind (key of ANSWER_KINDS), its phrasings (one drawn per use) and its weight."""

    kind: str
    texts: tuple[str, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class Style:
    """A synthetic dataset's distribution, as data."""

    name: str
    description: str
    modalities: tuple[tuple[Modality, float], ...]
    organs: tuple[Organ, ...]
    questions: tuple[Question, ...]
    lesion_counts: tuple[float, ...] = (0.5, 0.25, 0.15, 0.1)
    """Weights of 0, 1, 2, 3 lesions (P(0) = 0.5 balances the yes/no presence question)."""
    questions_per_image: int = 3


CT = Modality("ct", background=8, body=70, organ=120, outline=170, lesion=230, noise=6)
MRI = Modality("mri", background=0, body=40, organ=160, outline=100, lesion=50, noise=8)
XRAY = Modality("x-ray", background=235, body=190, organ=120, outline=80, lesion=30, noise=5, blur=0.6)
# shifted renderings: same answers, other contrast, heavier noise
CT_LOW = Modality("ct", background=40, body=80, organ=105, outline=130, lesion=165, noise=12, blur=0.8)
MRI_SPECKLE = Modality("mri", background=20, body=60, organ=140, outline=90, lesion=70, noise=6, speckle=0.25)

BRAIN, LUNG, LIVER = Organ("brain", "HEAD", "brain"), Organ("lung", "CHEST", "lungs"), Organ("liver", "ABD", "liver")
KIDNEY = Organ("kidney", "ABD", "kidneys")

PRESENCE = Question("presence", ("is there a lesion?", "are there any lesions?", "is there an abnormality?"), 3)
SIDE = Question("side", ("is the lesion on the left or right?", "which side is the lesion on?"), 2)
SIZE = Question("size", ("is the lesion large or small?",), 1)
COUNT = Question("count", ("how many lesions are there?", "how many lesions are seen?"), 1)
ORGAN = Question("organ", ("which organ is shown?", "what organ is this?"), 1)
MODALITY = Question("modality", ("what modality is this?", "what imaging modality was used?"), 1)
CAPTION = Question("caption", ("describe the image.", "write a short report."), 1)

STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style("base", "ct/mri/x-ray of brain, lung, liver; mostly closed questions",
              ((CT, 1), (MRI, 1), (XRAY, 1)), (BRAIN, LUNG, LIVER), (PRESENCE, SIDE, SIZE, COUNT, ORGAN, MODALITY)),
        # `base` without the modality pretraining held out: the same imaging domain as `pretrain`, a new question
        # type (size) and a closed-question-heavy mix without captions (the paper's in-domain VQA setting).
        Style("indomain", "ct/mri of brain, lung, liver (pretrain's modalities); adds the size question",
              ((CT, 1), (MRI, 1)), (BRAIN, LUNG, LIVER), (PRESENCE, SIDE, SIZE, COUNT, ORGAN, MODALITY)),
        Style("shifted", "out-of-distribution: low-contrast ct, speckled mri, kidneys, new phrasings",
              ((CT_LOW, 1), (MRI_SPECKLE, 1)), (BRAIN, LUNG, LIVER, KIDNEY),
              (Question("presence", ("does this scan show any lesion?", "is any abnormality present?"), 3),
               Question("side", ("on which side is the abnormality, left or right?",), 2),
               Question("size", ("is the abnormality small or large?",), 1),
               Question("count", ("how many abnormalities are present?",), 2), ORGAN, MODALITY)),
        # Pretraining holds out what the downstream `base` task adds: the x-ray modality and the size question.
        Style("pretrain", "caption-heavy ct/mri of all organs, no x-ray and no size question (for pretraining "
              "tiny bases; `base` adds both)",
              ((CT, 1), (MRI, 1)), (BRAIN, LUNG, LIVER, KIDNEY),
              (Question("caption", CAPTION.texts + ("what does this image show?",), 4),
               PRESENCE, SIDE, COUNT, ORGAN, MODALITY), questions_per_image=4),
    )
}

# --- drawing -------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]
SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, int, int, int], None]] = {
    "brain": lambda d, s, fill, line: d.ellipse(_px((0.2, 0.15, 0.8, 0.85), s), fill=fill, outline=line, width=2),
    "lungs": lambda d, s, fill, line: [d.ellipse(_px(b, s), fill=fill, outline=line, width=2)
                                       for b in ((0.14, 0.2, 0.46, 0.85), (0.54, 0.2, 0.86, 0.85))],
    "liver": lambda d, s, fill, line: d.polygon([(x * s, y * s) for x, y in ((0.12, 0.3), (0.8, 0.22), (0.75, 0.5),
                                                 (0.4, 0.78), (0.14, 0.65))], fill=fill, outline=line, width=2),
    "kidneys": lambda d, s, fill, line: [d.ellipse(_px(b, s), fill=fill, outline=line, width=2)
                                         for b in ((0.16, 0.3, 0.42, 0.75), (0.58, 0.3, 0.84, 0.75))],
}
SIZES = {"small": (0.035, 0.06), "large": (0.08, 0.11)}  # lesion radius as a fraction of the image side
NUMBER_WORDS = ("no", "one", "two", "three")


def _px(box: Box, s: int) -> list[float]:
    return [v * s for v in box]


def scene(style: Style, rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Sample what one image shows: modality, organ, lesions (all on one side, one size class)."""
    weights = np.array([w for _, w in style.modalities], dtype=float)
    modality = style.modalities[rng.choice(len(weights), p=weights / weights.sum())][0]
    organ = style.organs[rng.integers(len(style.organs))]
    counts = np.array(style.lesion_counts, dtype=float)
    count = int(rng.choice(len(counts), p=counts / counts.sum()))
    side = ("left", "right")[rng.integers(2)]
    size_class = ("small", "large")[rng.integers(2)]
    mask = Image.new("L", (size, size), 0)
    SHAPES[organ.shape](ImageDraw.Draw(mask), size, 255, 255)
    inside = np.asarray(mask) > 0
    lesions: list[tuple[float, float, float]] = []
    for _ in range(200):  # rejection sampling inside the organ, on the chosen side, without overlap
        if len(lesions) == count:
            break
        r = rng.uniform(*SIZES[size_class]) * size
        x, y = rng.uniform(r, size - r), rng.uniform(r, size - r)
        on_side = x + r < size / 2 if side == "left" else x - r > size / 2
        fits = on_side and all(inside[int(y + dy), int(x + dx)] for dx in (-r, 0, r - 1) for dy in (-r, 0, r - 1))
        if fits and all((x - a) ** 2 + (y - b) ** 2 > (r + c + 2) ** 2 for a, b, c in lesions):
            lesions.append((x, y, r))
    return {"modality": modality, "organ": organ, "count": len(lesions), "side": side, "size": size_class,
            "lesions": lesions}


def render(facts: dict[str, Any], rng: np.random.Generator, size: int) -> bytes:
    """Draw the scene and encode it as PNG (fixed settings: same bytes for the same input)."""
    m: Modality = facts["modality"]
    image = Image.new("L", (size, size), m.background)
    draw = ImageDraw.Draw(image)
    draw.ellipse(_px((0.04, 0.04, 0.96, 0.96), size), fill=m.body)
    SHAPES[facts["organ"].shape](draw, size, m.organ, m.outline)
    for x, y, r in facts["lesions"]:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=m.lesion)
    if m.blur:
        image = image.filter(ImageFilter.GaussianBlur(m.blur))
    pixels = np.asarray(image, dtype=np.float64)
    if m.speckle:
        pixels = pixels * (1 + m.speckle * rng.standard_normal(pixels.shape))
    pixels = pixels + m.noise * rng.standard_normal(pixels.shape)
    out = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


# --- questions -----------------------------------------------------------------------------------


def caption(f: dict[str, Any]) -> str:
    """A one-line report of the scene."""
    head = f"{f['modality'].name} of the {f['organ'].name}."
    if f["count"] == 0:
        return f"{head} no lesion is seen."
    noun = "lesion" if f["count"] == 1 else "lesions"
    return f"{head} {NUMBER_WORDS[f['count']]} {f['size']} {noun} on the {f['side']}."


# kind -> (answer or None when not applicable, answer_type, VQA-RAD question_type)
ANSWER_KINDS: dict[str, tuple[Callable[[dict[str, Any]], str | None], str, str]] = {
    "presence": (lambda f: "yes" if f["count"] else "no", "CLOSED", "PRES"),
    "side": (lambda f: f["side"] if f["count"] else None, "CLOSED", "POS"),
    "size": (lambda f: f["size"] if f["count"] else None, "CLOSED", "SIZE"),
    "count": (lambda f: str(f["count"]), "OPEN", "COUNT"),
    "organ": (lambda f: f["organ"].name, "OPEN", "ORGAN"),
    "modality": (lambda f: f["modality"].name, "OPEN", "MODALITY"),
    "caption": (caption, "OPEN", "OTHER"),
}


def ask(style: Style, facts: dict[str, Any], rng: np.random.Generator) -> list[dict[str, str]]:
    """Draw ``questions_per_image`` distinct applicable questions (by weight) with their answers."""
    usable = [(q, ANSWER_KINDS[q.kind][0](facts)) for q in style.questions]
    usable = [(q, a) for q, a in usable if a is not None]
    weights = np.array([q.weight for q, _ in usable], dtype=float)
    k = min(style.questions_per_image, len(usable))
    picked = sorted(rng.choice(len(usable), size=k, replace=False, p=weights / weights.sum()))
    out = []
    for i in picked:
        q, answer = usable[i]
        _, answer_type, question_type = ANSWER_KINDS[q.kind]
        out.append({"question": q.texts[rng.integers(len(q.texts))], "answer": answer,
                    "answer_type": answer_type, "question_type": question_type})
    return out


# --- datasets ------------------------------------------------------------------------------------

IMAGE_FOLDER = "VQA_RAD Image Folder"


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=True) + "\n", encoding="utf-8")


def generate(
    out: Path | str,
    *,
    n: int = 200,
    seed: int = 0,
    style: str | Style = "base",
    size: int = 64,
    test_fraction: float = 0.2,
    layout: Literal["vqa-rad", "r2gen"] = "vqa-rad",
) -> dict[str, Any]:
    """Write ``n`` synthetic images and their questions (or reports) under ``out``; return the info.

    Images ``[0, n - n_test)`` are train and the rest test (no image in both). ``vqa-rad`` layout:
    ``VQA_RAD Image Folder/synth_NNNNN.png`` + ``trainset.json``/``testset.json`` with the VQA-RAD
    fields; ``r2gen`` layout: ``images/synth_NNNNN/0.png`` + ``annotation.json`` with the caption as
    report. ``synth.json`` records the parameters.
    """
    spec = STYLES[style] if isinstance(style, str) else style
    if n < 1 or not 0 <= test_fraction < 1 or size < 32:
        raise ValueError(f"synth: need n >= 1, 0 <= test_fraction < 1, size >= 32 (got {n}, {test_fraction}, {size})")
    out = Path(out)
    n_test = int(round(n * test_fraction))
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    image_dir = out / (IMAGE_FOLDER if layout == "vqa-rad" else "images")
    image_dir.mkdir(parents=True, exist_ok=True)
    qid = 0
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        facts = scene(spec, rng, size)
        split = "test" if i >= n - n_test else "train"
        name = f"synth_{i:05d}"
        if layout == "r2gen":
            (image_dir / name).mkdir(exist_ok=True)
            (image_dir / name / "0.png").write_bytes(render(facts, rng, size))
            rows[split].append({"id": name, "report": caption(facts), "image_path": [f"{name}/0.png"], "split": split})
            continue
        (image_dir / f"{name}.png").write_bytes(render(facts, rng, size))
        for qa in ask(spec, facts, rng):
            rows[split].append({
                "qid": qid, "image_name": f"{name}.png", "image_organ": facts["organ"].region,
                "answer": qa["answer"], "answer_type": qa["answer_type"], "question_type": qa["question_type"],
                "question": qa["question"], "phrase_type": "freeform" if split == "train" else "test_freeform",
            })
            qid += 1
    if layout == "r2gen":
        _dump(out / "annotation.json", {"train": rows["train"], "val": [], "test": rows["test"]})
    else:
        _dump(out / "trainset.json", rows["train"])
        _dump(out / "testset.json", rows["test"])
    info = {"generator": "raymed.data.synth", "style": asdict(spec), "seed": seed, "n": n, "size": size,
            "test_fraction": test_fraction, "layout": layout, "rows": {k: len(v) for k, v in rows.items()}}
    _dump(out / "synth.json", info)
    return info
