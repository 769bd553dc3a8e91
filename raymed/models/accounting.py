"""Trainable-parameter accounting per tower x group, for any method (intrinsic or peft)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from raymed.models import GROUPS, Family, ParamInfo

ADAPTER = "adapter"  # group of the parameters a peft method adds
_PEFT_PREFIX = re.compile(r"(^|\.)base_model\.(model\.)?")
_PEFT_INNER = re.compile(r"\.(base_layer|ln_tuning_layers\.[^.]+|lora_[AB]\.[^.]+|ia3_l)(?=\.|$)")


@dataclass
class Accounting:
    """Counts of one model under one method. `groups[tower][group]` = parameters; `trainable_groups` likewise."""

    model: str
    family: str
    method: str
    towers: list[str]
    total: int
    trainable: int
    groups: dict[str, dict[str, int]]
    trainable_groups: dict[str, dict[str, int]]
    unused: int
    unused_names: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "percent": self.percent}


def tower_of_adapter(family: Family, name: str, prompt_tower: str) -> str:
    """Tower of a peft-added parameter: that of the module it hangs on, else the prompt's host tower."""
    base = _PEFT_INNER.sub("", _PEFT_PREFIX.sub(r"\1", name))
    try:
        return family.tower_of(base)
    except KeyError:
        return prompt_tower


def account(
    model: nn.Module,
    family: Family,
    base_infos: Sequence[ParamInfo],
    base_params: dict[int, str],
    *,
    model_name: str,
    method: str,
    towers: Sequence[str],
    prompt_tower: str,
) -> Accounting:
    """Account `model` (possibly peft-wrapped) given the classification of its base model before wrapping.

    `base_params` maps id(parameter) -> base name, so base parameters are recognised under peft's renaming.
    """
    info_by_name = {i.name: i for i in base_infos}
    groups = {t: dict.fromkeys(GROUPS, 0) for t in family.towers}
    trainable_groups = {t: dict.fromkeys(GROUPS, 0) for t in family.towers}
    total = trainable = 0
    for name, p in model.named_parameters():
        base_name = base_params.get(id(p))
        if base_name is not None:
            info = info_by_name[base_name]
            tower, group = info.tower, info.group
        else:
            tower, group = tower_of_adapter(family, name, prompt_tower), ADAPTER
            groups[tower].setdefault(ADAPTER, 0)
            trainable_groups[tower].setdefault(ADAPTER, 0)
        n = numel(p)
        groups[tower][group] += n
        total += n
        if p.requires_grad:
            trainable_groups[tower][group] += n
            trainable += n
    unused = [i for i in base_infos if i.unused]
    return Accounting(
        model=model_name, family=family.name, method=method, towers=list(towers), total=total, trainable=trainable,
        groups=groups, trainable_groups=trainable_groups, unused=sum(i.numel for i in unused),
        unused_names=[i.name for i in unused],
    )


def numel(p: Any) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (`ds_numel`; the local tensor is empty)."""
    return int(getattr(p, "ds_numel", 0) or p.numel())


def format_table(acc: Accounting) -> str:
    """Human-readable tower x group table: trainable / total per cell."""
    cols = list(GROUPS) + ([ADAPTER] if any(ADAPTER in g for g in acc.groups.values()) else [])
    cells = {
        t: [f"{acc.trainable_groups[t].get(c, 0):,}/{row.get(c, 0):,}" for c in cols] for t, row in acc.groups.items()
    }
    width = 2 + max(len(x) for x in [*cols, *(c for row in cells.values() for c in row)])
    lines = [
        f"model {acc.model} (family {acc.family}), method {acc.method}, towers {','.join(acc.towers)}",
        f"trainable {acc.trainable:,} of {acc.total:,} parameters ({acc.percent:.4f}%)",
        f"unused (no part in the forward pass, never trainable): {acc.unused:,}",
        "",
        "trainable / total".ljust(14) + "".join(c.rjust(width) for c in cols),
    ]
    for tower, row in cells.items():
        lines.append(tower.ljust(14) + "".join(c.rjust(width) for c in row))
    return "\n".join(lines)
