"""Model-family registry: resolve a preset name or a local HF directory to (family, model, processor)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymed.models.base import GROUPS, Family, ModelLoadError, ParamInfo, Preset, read_model_type
from raymed.models.llava import LlavaFamily
from raymed.models.miss import MissFamily
from raymed.models.sources import local_folder

FAMILIES: dict[str, Family] = {f.name: f for f in (LlavaFamily(), MissFamily())}
PRESETS: dict[str, Preset] = {name: p for f in FAMILIES.values() for name, p in f.presets.items()}

__all__ = [
    "FAMILIES", "GROUPS", "PRESETS", "Family", "ModelLoadError", "ModelRef", "ParamInfo", "Preset",
    "get_family", "resolve", "load_model", "load_processor",
]


@dataclass(frozen=True)
class ModelRef:
    """A resolved `--model` value: a preset or a local directory (a Hub id or URI made local), and its family."""

    family: Family
    preset: Preset | None = None
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.preset.name if self.preset else str(self.path)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def resolve(model: str) -> ModelRef:
    """Resolve a preset name, a local HF model directory, a Hub id (``ORG/NAME[@revision]``) or an ``s3://`` /
    ``gs://`` model folder; an original LLaVA-Med release is converted once (:mod:`raymed.models.sources`)."""
    if model in PRESETS:
        preset = PRESETS[model]
        return ModelRef(FAMILIES[preset.family], preset=preset)
    if not Path(model).expanduser().exists() and "/" not in model and "\\" not in model:
        raise ModelLoadError(
            f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}), no such directory, not a Hub id (ORG/NAME)"
        )
    path = local_folder(model)
    model_type = read_model_type(path)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return ModelRef(family, path=path)
    raise ModelLoadError(
        f"{path}: model_type {model_type!r} is not supported; families: "
        + ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    )


def load_model(ref: ModelRef | str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Build (preset) or load (directory) a model. `device='meta'` builds the architecture without memory."""
    ref = resolve(ref) if isinstance(ref, str) else ref
    if ref.path is not None:
        return ref.family.load_pretrained(ref.path, dtype=dtype)
    assert ref.preset is not None
    if ref.preset.meta_only and device != "meta":
        raise ModelLoadError(
            f"preset {ref.preset.name!r} is a full-size architecture for accounting only (device='meta'); "
            "to train it, convert the released weights and pass their directory as the model"
        )
    model = ref.family.build(ref.preset, device=device, seed=seed)
    return model.to(dtype) if device != "meta" else model


def load_processor(ref: ModelRef | str) -> Any:
    ref = resolve(ref) if isinstance(ref, str) else ref
    if ref.path is not None:
        return ref.family.load_processor(ref.path)
    assert ref.preset is not None
    return ref.family.build_processor(ref.preset)
