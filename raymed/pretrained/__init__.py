"""Tiny pretrained Med-VLMs shipped with raymed, made by raymed itself (`tools/pretrain.py` in the source repository).

Each subdirectory is a plain HF model directory (config, `model.safetensors`, tokenizer, processor) plus
`provenance.json`: the command, seed, data spec, steps, metrics and raymed version that produced it.
Presets with a `shipped_dir` (`tiny-llava-med`, `tiny-miss-med`) load from here; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
"""The `raymed` package directory: `Preset.shipped_dir` is relative to it."""


def shipped_path(shipped_dir: str) -> Path:
    """Absolute path of a shipped model directory, with an actionable error when it is missing."""
    from raymed.models.base import ModelLoadError

    path = PACKAGE_ROOT / shipped_dir
    if not (path / "config.json").is_file():
        name = Path(shipped_dir).name
        family = "miss" if "miss" in name else "llava"
        raise ModelLoadError(
            f"shipped weights {path} are missing (no config.json); reinstall raymed, or rebuild them with "
            f"`python tools/pretrain.py --family {family} --out {path}` from a raymed source checkout"
        )
    return path


def provenance(shipped_dir: str) -> dict[str, Any]:
    """The provenance record of a shipped model directory."""
    return json.loads((shipped_path(shipped_dir) / "provenance.json").read_text())
