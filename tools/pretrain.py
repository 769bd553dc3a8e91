"""`python -m tools.pretrain --family llava|miss --out DIR [--seed S] [--minutes M]`: a tiny pretrained Med-VLM.

The paper's question needs a *pretrained* base: tuning the LayerNorms of a random network teaches nothing.
This recipe makes one from scratch, on CPU, with the same Ray Train + DeepSpeed recipe as every fine-tuning
run (`raymed.train.launch.fit`, method `full`) on the synthetic `pretrain` distribution (caption-heavy CT and MRI
of four organs; it holds out the x-ray modality and the size question that the downstream `base` style adds),
then writes a plain HF model directory (weights, config, tokenizer, processor) and
`provenance.json`. The shipped presets `tiny-llava-med` and `tiny-miss-med` were made by this command:

    python -m tools.pretrain --family llava --out raymed/pretrained/tiny-llava-med
    python -m tools.pretrain --family miss --out raymed/pretrained/tiny-miss-med

Steps: random-init model directory (seeded) -> `fit` (zero-shot eval, train, final eval on the pretraining
test split, the downstream `base` style and the out-of-distribution `shifted` style) -> merge the checkpoint
into `--out` -> provenance. `--minutes` converts a nominal budget into a fixed number of epochs (and fewer
images below one epoch) with the recipe's measured seconds per step, so a run is deterministic for its
arguments, whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raymed.data.plan import CACHE

STYLE = "pretrain"
DOWNSTREAM_STYLE, OOD_STYLE = "base", "shifted"
TEST_FRACTION = 0.2  # raymed.data.synth.generate's default split


def llava_architecture() -> Any:
    """~0.9 M parameters: CLIP 64-d x 4 layers (the last unused) at 64 px, patch 16; Mistral 128-d x 4."""
    from raymed.models.llava import llava_config

    return llava_config(
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, image_size=64,
             patch_size=16, projection_dim=64),
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256),
    )


def miss_architecture() -> Any:
    """~1.1 M parameters: ViT 96-d x 3 at 64 px, patch 16; BERT 96-d x 3 encoder and decoder.

    BLIP uses one `encoder_hidden_size` for both cross-attentions (text -> image, decoder -> text), so the
    vision and text widths must match.
    """
    from transformers import BlipConfig

    from raymed.models.vocab import build_bert_tokenizer

    tok = build_bert_tokenizer()
    return BlipConfig(
        vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=3,
                           image_size=64, patch_size=16, initializer_range=0.02),  # see tiny_miss_config
        text_config=dict(vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                         num_attention_heads=3, encoder_hidden_size=96, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id),
    )


@dataclass(frozen=True)
class Recipe:
    """How one shipped base is made: architecture, data size and the training settings of `fit`."""

    family: str
    preset: str
    architecture: Callable[[], Any]
    synth_n: int
    """Synthetic images (80 % train, 4 questions each)."""
    epochs: int
    """Passes over the training rows, each in a fresh seeded order (see `pretraining_data`)."""
    lr: float
    batch_size: int
    max_length: int
    max_new_tokens: int
    eval_rows: int
    """Rows of each eval set (pretraining test split, downstream `base`, OOD `shifted`)."""
    seconds_per_step: float
    """Measured on the reference machine (1 core per worker): converts `--minutes` into steps."""

    def steps(self, synth_n: int, epochs: int = 1) -> int:
        """Optimizer steps of `epochs` passes over `synth_n` images (4 questions per training image)."""
        from raymed.data.synth import STYLES

        rows = (synth_n - int(round(synth_n * TEST_FRACTION))) * STYLES[STYLE].questions_per_image
        return max(1, math.ceil(rows * epochs / self.batch_size))

    def plan(self, minutes: float | None) -> tuple[int, int]:
        """(images, epochs) for a nominal budget; the recipe's own when `minutes` is None."""
        if minutes is None:
            return self.synth_n, self.epochs
        steps = max(1, int(minutes * 60 / self.seconds_per_step))
        epochs = steps // self.steps(self.synth_n)
        if epochs >= 1:
            return self.synth_n, epochs
        # Below one epoch: fewer images (at least 20: every split and question kind still present).
        n = self.synth_n
        while n > 20 and self.steps(n) > steps:
            n = max(20, n // 2)
        return n, 1


RECIPES: dict[str, Recipe] = {
    # lr 1e-3 for both: at 2e-3 the LLaVA recipe's result depended on the batch order (test accuracy 0.43-0.75
    # over three orders of the same rows), which only surfaced once Ray Data kept the order fixed.
    "llava": Recipe("llava", "tiny-llava-med", llava_architecture, synth_n=600, epochs=24, lr=1e-3, batch_size=8,
                    max_length=72, max_new_tokens=20, eval_rows=240, seconds_per_step=0.1),
    "miss": Recipe("miss", "tiny-miss-med", miss_architecture, synth_n=600, epochs=36, lr=1e-3, batch_size=8,
                   max_length=32, max_new_tokens=24, eval_rows=240, seconds_per_step=0.1),
}


# ---- the recipe -----------------------------------------------------------------------------------
def write_init(recipe: Recipe, seed: int, out: Path) -> int:
    """A randomly initialised (seeded) model directory with its processor; returns the parameter count."""
    from raymed.models import get_family
    from raymed.models.base import Preset

    family = get_family(recipe.family)
    arch = Preset(f"{recipe.preset}-init", recipe.family, "random init", recipe.architecture)
    model = family.build(arch, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    family.build_processor(arch).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def pretraining_data(n: int, seed: int, passes: int, root: Path) -> Path:
    """Prepared shards of the `pretrain` style whose train split holds `passes` copies of the training rows,
    each copy in a fresh seeded order: one Ray Train epoch over them = `passes` shuffled epochs.

    The recipe streams rows in file order and never reshuffles, and the generator writes an image's
    questions side by side: in file order every batch holds two images and the tiny models stay on the
    language prior. Images are referenced by path (`image_uri`), not copied.
    """
    from raymed.data.prepare import prepare
    from raymed.data.synth import generate

    raw = root / "raw"
    generate(raw, n=n, seed=seed, style=STYLE, test_fraction=TEST_FRACTION)
    rows = json.loads((raw / "trainset.json").read_text())
    shuffled = [{**rows[i], "qid": f"{rows[i]['qid']}-p{p}"}
                for p in range(passes) for i in np.random.default_rng([seed, p]).permutation(len(rows))]
    (raw / "trainset.json").write_text(json.dumps(shuffled))
    # no validation split: pretraining chooses nothing, and every training row stays in the recipe
    prepare("vqa-rad", raw, root / "prepared", images="uri", rows_per_shard=8192, overwrite=True, val_fraction=0)
    return root / "prepared"


def training_overrides(recipe: Recipe, init_dir: Path, work: Path, seed: int, n: int, epochs: int) -> dict[str, Any]:
    """The `fit` config: method `full` on the `pretrain` style, evaluated before and after training only."""
    from raymed.data.plan import synthetic_dataset

    eval_n = max(n // 4, 10)
    return {
        "model.name": str(init_dir), "model.family": recipe.family, "method.name": "full",
        "data.path": str(pretraining_data(n, seed, epochs, work / "data")), "data.select_split": None,
        "data.eval_sets": {
            "ood": str(synthetic_dataset(OOD_STYLE, eval_n, seed + 1)),  # named as in fine-tuning runs
            # Zero-shot transfer to the downstream task of the default sweep (a different mix, no captions).
            DOWNSTREAM_STYLE: str(synthetic_dataset(DOWNSTREAM_STYLE, eval_n, seed + 2)),
        },
        "data.max_length": recipe.max_length, "data.max_eval_rows": recipe.eval_rows,
        "data.cache_mb": 0,  # one Ray Train epoch over `epochs` shuffled passes: nothing to replay
        "data.shuffle": False,  # the passes are shuffled on disk (pretraining_data): stream them in file order
        "train.epochs": 1, "train.batch_size": recipe.batch_size, "train.lr": recipe.lr, "train.seed": seed,
        "train.zero_shot": True, "train.eval_batch_size": 48,
        "train.max_new_tokens": recipe.max_new_tokens,
        "scaling.num_workers": 1, "scaling.cpus_per_worker": 1.0,
        # The shipped bases were made with ZeRO-2 on this one worker: keep that arithmetic so re-runs reproduce them.
        "deepspeed.zero_stage": 2, "deepspeed.shard_single_worker": True,
        "run.storage": str(work / "runs"), "run.name": recipe.preset, "run.keep_checkpoints": 1, "run.metrics_export": False,
    }


def pretrain(family: str, out: Path, seed: int = 0, minutes: float | None = None, work: Path | None = None,
             command: str | None = None) -> dict[str, Any]:
    """Pretrain one tiny base into `out` (an HF model directory + `provenance.json`); return the provenance."""
    import ray

    from raymed import __version__
    from raymed.train.checkpoint import load_trainable
    from raymed.config import load_config
    from raymed.machine import describe
    from raymed.train.launch import fit

    recipe = RECIPES[family]
    n, epochs = recipe.plan(minutes)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "provenance.json").is_file():
        raise FileExistsError(f"refusing to replace {out}: it is not empty and not written by tools/pretrain.py "
                              "(no provenance.json); choose another --out")
    work = Path(work or CACHE / "pretrain" / f"{recipe.preset}-s{seed}").resolve()
    init_dir = work / "init"
    for stale in (init_dir, work / "runs", work / "data"):  # a fresh run, never a resumed one
        shutil.rmtree(stale, ignore_errors=True)
    params = write_init(recipe, seed, init_dir)
    cfg = load_config(None, training_overrides(recipe, init_dir, work, seed, n, epochs))
    started_ray = not ray.is_initialized()
    t0 = time.time()
    try:
        summary = fit(cfg)
    finally:
        if started_ray:
            ray.shutdown()
    wall_s = time.time() - t0

    model, processor, _ = load_trainable(Path(summary["checkpoint"]) / "model")
    if out.exists():
        for child in out.iterdir():  # replace a previous model directory, keep nothing stale
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)

    metrics = summary["metrics"]
    provenance = {
        "preset": recipe.preset,
        "family": family,
        "command": command or f"python -m tools.pretrain --family {family} --out {out} --seed {seed}"
                              + (f" --minutes {minutes:g}" if minutes is not None else ""),
        "seed": seed,
        "raymed_version": __version__,
        "architecture": architecture_summary(model.config, family),
        "parameters": params,
        "data": {
            "generator": "raymed.data.synth", "style": STYLE, "n_images": n, "seed": seed,
            "test_fraction": TEST_FRACTION,
            "train_order": "one copy of the training rows per epoch, each permuted by numpy default_rng([seed, epoch])",
            "eval_sets": {
                "test": {"style": STYLE, "n_images": n, "seed": seed, "split": "test"},
                "ood": {"style": OOD_STYLE, "n_images": max(n // 4, 10), "seed": seed + 1, "split": "test"},
                DOWNSTREAM_STYLE: {"style": DOWNSTREAM_STYLE, "n_images": max(n // 4, 10), "seed": seed + 2,
                                   "split": "test"},
            },
            "max_eval_rows": recipe.eval_rows,
        },
        "training": {
            "recipe": "raymed.train.launch.fit", "method": "full", "epochs": epochs, "steps": summary["steps"],
            "batch_size": recipe.batch_size, "lr": recipe.lr, "budget_minutes": minutes,
            "mean_train_loss": summary["loss"],
            "wall_s": round(wall_s, 1), "config_hash": summary["config_hash"], "config": summary["config"],
        },
        "metrics": {
            "zero_shot": {k.removeprefix("zeroshot/"): v for k, v in sorted(metrics.items()) if k.startswith("zeroshot/")},
            "final": {k.removeprefix("eval/"): v for k, v in sorted(metrics.items()) if k.startswith("eval/")},
        },
        "weights_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
        "machine": describe(),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def architecture_summary(config: Any, family: str) -> dict[str, Any]:
    """The numbers that define the architecture (tests assert the shipped ones)."""
    v, t = config.vision_config, config.text_config
    out = {
        "vision": {k: getattr(v, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "image_size", "patch_size")},
        "text": {k: getattr(t, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads")},
    }
    if family == "llava":
        out["text"]["num_key_value_heads"] = t.num_key_value_heads
        out["vision_feature_layer"] = config.vision_feature_layer
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=sorted(RECIPES))
    ap.add_argument("--out", required=True, type=Path, help="model directory to write (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0, help="model init, data and shuffling seed")
    ap.add_argument("--minutes", type=float, default=None,
                    help="nominal budget, converted to epochs with the recipe's seconds per step (default: the "
                         "recipe's own epochs)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: under RAYMED_CACHE)")
    args = ap.parse_args(argv)
    recipe = RECIPES[args.family]
    n, epochs = recipe.plan(args.minutes)
    print(f"pretraining {recipe.preset}: {n} synthetic images ({STYLE} style), {epochs} epochs, "
          f"{recipe.steps(n, epochs)} steps, lr {recipe.lr:g}, seed {args.seed}", flush=True)
    command = "python -m tools.pretrain " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        prov = pretrain(args.family, args.out, seed=args.seed, minutes=args.minutes, work=args.work, command=command)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({prov['parameters']:,} parameters, {prov['training']['steps']} steps, "
          f"{prov['training']['wall_s']:.0f}s)")
    for when in ("zero_shot", "final"):
        m = prov["metrics"][when]
        for name in ("test", DOWNSTREAM_STYLE, "ood"):
            print(f"  {when:9s} {name:5s} closed {m.get(f'{name}/closed_acc', float('nan')):.3f}  "
                  f"open {m.get(f'{name}/open_acc', float('nan')):.3f}  overall {m.get(f'{name}/overall_acc', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
