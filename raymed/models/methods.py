"""Fine-tuning methods as data, and `apply_method`: the one place that decides what trains.

Intrinsic methods (`full`, `ln`, `attn`, `ffn`, and unions like `ln+attn`) unfreeze parameter groups of
the chosen towers. Extrinsic methods wrap the model with a `peft` config whose targets come from the same
group tables (`lora`: attention projections; `ia3`: key and value projections + FFN down projections, the
(IA)3 paper's and peft's default placement).
Parameters that take no part in the forward pass are never trainable (docs/DESIGN.md §2.3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from raymed.models.accounting import Accounting, account
from raymed.models import GROUPS, Family, ModelRef, ParamInfo
from raymed.models.base import prefix_cache


class MethodError(ValueError):
    """A method, tower or option that cannot apply to the model."""


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: intrinsic groups to unfreeze, or a peft config to wrap the model with."""

    name: str
    description: str
    groups: tuple[str, ...] = ()  # intrinsic: trainable groups; peft: groups whose modules are targets
    peft: str | None = None  # peft method: lora | ia3 | prefix | prompt | ln_tuning
    defaults: Mapping[str, Any] = field(default_factory=dict)
    families: tuple[str, ...] = ()  # families it applies to (empty: all)

    @property
    def intrinsic(self) -> bool:
        return self.peft is None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", "all (used) parameters", groups=GROUPS),
        Method("ln", "LayerNorm / RMSNorm weights and biases", groups=("ln",)),
        Method("attn", "self- and cross-attention projections", groups=("attn",)),
        Method("ffn", "feed-forward (MLP) linears", groups=("ffn",)),
        Method("lora", "peft LoRA on the attention projections", groups=("attn",), peft="lora",
               defaults={"r": 8, "lora_alpha": 32, "lora_dropout": 0.1}),
        Method("ia3", "peft (IA)3 on key / value projections and FFN down projections", groups=("attn", "ffn"),
               peft="ia3"),
        # The MISS authors' peft baselines (TIMMY-CHAN/MISS models/peft_miss.py; the same authors' MILE): LoRA on
        # `query`/`value` (peft's BERT default), (IA)3 on `key`/`value`/`output.dense` with every `output.dense`
        # (attention output and FFN output, peft's suffix match) scaled as a feed-forward module.
        Method("lora-qv", "peft LoRA r=4, alpha 32, dropout 0.1 on query/value (MISS baseline)", groups=("attn",),
               peft="lora", families=("miss",),
               defaults={"r": 4, "lora_alpha": 32, "lora_dropout": 0.1, "target_names": ["query", "value"]}),
        Method("ia3-kvo", "peft (IA)3 on key/value/output.dense (MISS baseline)", groups=("attn", "ffn"), peft="ia3",
               families=("miss",),
               defaults={"target_names": ["key", "value", "output.dense"], "feedforward_names": ["output.dense"]}),
        Method("prefix", "peft prefix tuning, 10 virtual tokens with a projection", peft="prefix",
               defaults={"num_virtual_tokens": 10, "prefix_projection": True}),
        Method("p-tuning-v2", "peft prefix tuning without projection (P-tuning v2)", peft="prefix",
               defaults={"num_virtual_tokens": 10, "prefix_projection": False}),
        Method("prompt", "peft prompt tuning, 10 virtual tokens", peft="prompt",
               defaults={"num_virtual_tokens": 10}),
        Method("peft-ln", "peft LNTuningConfig with explicit LN-only targets (cross-check of `ln`)",
               groups=("ln",), peft="ln_tuning"),
    )
}

# Where prompt-learning methods attach: the text model that reads the question.
PROMPT_TOWER = {"llava": "language", "miss": "text_encoder"}
# Prefix tuning on MISS, as its authors' baselines (models/peft_miss.py): the question encoder and the answer decoder
# each get their own 10-token prefix (prompt tuning stays on the encoder, which reads the question).
PREFIX_TOWERS = {"llava": ("language",), "miss": ("text_encoder", "text_decoder")}
# (IA)3's attention targets: the key and value projections, by their module names per family (peft's own
# default table names the same: `k_proj`/`v_proj` for LLaMA/Mistral/CLIP, `key`/`value` for BERT). BLIP's
# vision attention has one fused `qkv` linear, so (IA)3 scales only its FFN there.
IA3_KEY_VALUE = {"llava": ("k_proj", "v_proj"), "miss": ("key", "value")}


def get_method(name: str) -> Method:
    """A registered method, or an intrinsic union such as `ln+attn`."""
    if name in METHODS:
        return METHODS[name]
    parts = name.split("+")
    if len(parts) > 1 and all(p in METHODS and METHODS[p].intrinsic for p in parts):
        groups = tuple(dict.fromkeys(g for p in parts for g in METHODS[p].groups))
        return Method(name, "union of " + ", ".join(parts), groups=groups)
    raise MethodError(
        f"unknown method {name!r}; known: {', '.join(METHODS)}, or an intrinsic union like 'ln+attn' of "
        + ", ".join(n for n, m in METHODS.items() if m.intrinsic)
    )


def check_towers(family: Family, method: str, towers: Sequence[str] | None) -> tuple[str, ...]:
    spec = get_method(method)
    if spec.families and family.name not in spec.families:
        raise MethodError(f"method {method!r} applies to family {'/'.join(spec.families)}, not {family.name!r}")
    if not towers:
        return tuple(family.towers)
    bad = [t for t in towers if t not in family.towers]
    if bad:
        raise MethodError(
            f"family {family.name!r}, method {method!r}: unknown tower(s) {bad}; towers: {', '.join(family.towers)}"
        )
    return tuple(dict.fromkeys(towers))


def _target_modules(
    model: nn.Module, family: Family, infos: Sequence[ParamInfo], groups: Sequence[str], towers: Sequence[str]
) -> dict[str, str]:
    """Linear / norm modules whose parameters fall in `groups` of `towers` (used ones only): name -> group."""
    infos = {i.name: i for i in infos}
    targets: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        params = [f"{mod_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if not params or not all(p in infos for p in params):
            continue
        info = infos[params[0]]
        if info.unused or info.tower not in towers or info.group not in groups:
            continue
        if (info.group in ("attn", "ffn") and isinstance(module, nn.Linear)) or (
            info.group == "ln" and family.is_norm(module)
        ):
            targets[mod_name] = info.group
    return targets


def _ffn_down(model: nn.Module, names: Sequence[str]) -> list[str]:
    """FFN linears that read the intermediate activation (in_features > out_features): IA3's feed-forward set."""
    mods = dict(model.named_modules())
    return [n for n in names if mods[n].in_features > mods[n].out_features]


def apply_method(
    model: nn.Module,
    ref: ModelRef,
    method: str,
    towers: Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Accounting]:
    """Freeze / wrap `model` for `method` on `towers`; returns the model to train and its accounting.

    peft methods initialise their new weights (LoRA's A, prefix embeddings) from `seed` alone, whatever the
    global RNG has been through (a pretrained base is loaded, not built from a seed), and leave the global
    RNG as it was. Raises MethodError when the method or a tower matches no parameter.
    """
    family = ref.family
    spec = get_method(method)
    towers = check_towers(family, method, towers)
    opts = {**spec.defaults, **(options or {})}
    infos = family.classify(model)
    base_params = {id(p): n for n, p in model.named_parameters()}
    if spec.intrinsic:
        if opts:
            raise MethodError(f"method {method!r} takes no options, got {sorted(opts)}")
        n = 0
        by_name = dict(model.named_parameters())
        for info in infos:
            train = info.group in spec.groups and info.tower in towers and not info.unused
            by_name[info.name].requires_grad_(train)
            n += train
        if n == 0:
            raise MethodError(f"family {family.name!r}, method {method!r}, towers {list(towers)}: no parameter matches")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _apply_peft(model, family, infos, spec, towers, opts)
    acc = account(
        model, family, infos, base_params, model_name=ref.name, method=method, towers=towers,
        prompt_tower=PROMPT_TOWER[family.name],
    )
    return model, acc


def _apply_peft(
    model: nn.Module, family: Family, infos: Sequence[ParamInfo], spec: Method, towers: Sequence[str], opts: dict
) -> nn.Module:
    import peft  # deferred: ~5 s import

    for p in model.parameters():
        p.requires_grad_(False)
    if spec.peft in ("prefix", "prompt"):
        hosts = prompt_hosts(family.name, spec, towers)
        cls = peft.PrefixTuningConfig if spec.peft == "prefix" else peft.PromptTuningConfig
        if family.name == "miss":
            # BLIP-VQA is no standard peft task: the question encoder is a BERT feature extractor, the answer
            # decoder a causal LM (as the MISS authors configure them), each wrapped on its own.
            for host in hosts:
                tower = getattr(model, host)
                task = "FEATURE_EXTRACTION" if host == "text_encoder" else "CAUSAL_LM"
                kwargs = {"encoder_hidden_size": tower.config.hidden_size} if spec.peft == "prefix" else {}
                wrapped = peft.get_peft_model(tower, cls(task_type=task, **{**kwargs, **opts}))
                if spec.peft == "prefix":
                    prefix_cache(wrapped)
                setattr(model, host, wrapped)
            return model
        if spec.peft == "prefix":
            opts.setdefault("encoder_hidden_size", model.config.text_config.hidden_size)
        wrapped = peft.get_peft_model(model, cls(task_type=family.peft_task_type, **opts))
        if spec.peft == "prefix":
            prefix_cache(wrapped)
        return wrapped

    groups = opts.pop("target_groups", spec.groups)
    names, ff_names = opts.pop("target_names", None), opts.pop("feedforward_names", None)
    targets = _target_modules(model, family, infos, groups, towers)
    if names:  # peft-style suffix match on module names, within the groups and towers
        targets = {t: g for t, g in targets.items() if any(t == n or t.endswith("." + n) for n in names)}
    if not targets:
        raise MethodError(
            f"family {family.name!r}, method {spec.name!r}, towers {list(towers)}: "
            f"no module of group(s) {list(groups)} to target"
        )
    if spec.peft == "lora":
        cfg = peft.LoraConfig(target_modules=list(targets), **opts)
    elif spec.peft == "ia3":
        if ff_names:  # an explicit table (e.g. the MISS authors' ia3-kvo): every named module, as named
            kv, ff = [t for t in targets if not any(t.endswith("." + n) for n in ff_names)], \
                [t for t in targets if any(t.endswith("." + n) for n in ff_names)]
        else:  # key and value projections + FFN down projections, by module type
            kv = [t for t, g in targets.items() if g == "attn" and t.rsplit(".", 1)[-1] in IA3_KEY_VALUE[family.name]]
            ff = _ffn_down(model, [t for t, g in targets.items() if g == "ffn"])
        if not kv + ff:
            raise MethodError(f"family {family.name!r}, method {spec.name!r}, towers {list(towers)}: no key / value "
                              "projection or FFN down projection to scale")
        cfg = peft.IA3Config(target_modules=kv + ff, feedforward_modules=ff, **opts)
    elif spec.peft == "ln_tuning":
        cfg = peft.LNTuningConfig(target_modules=list(targets), **opts)
    else:  # pragma: no cover - registry and this switch are kept together
        raise MethodError(f"unhandled peft method {spec.peft!r}")
    return peft.get_peft_model(model, cfg)



def prompt_hosts(family: str, spec: Method, towers: Sequence[str]) -> list[str]:
    """The towers a prompt-learning method attaches to, of those asked for; refused when none is."""
    candidates = PREFIX_TOWERS[family] if spec.peft == "prefix" else (PROMPT_TOWER[family],)
    hosts = [t for t in candidates if t in towers]
    if not hosts:
        raise MethodError(f"family {family!r}, method {spec.name!r} attaches to tower(s) {list(candidates)}, "
                          f"none of which is in towers {list(towers)}")
    return hosts


def effective_towers(model: str, family: str | None, method: str, towers: Sequence[str] | None) -> list[str] | None:
    """The towers a method really changes: a prompt-learning method attaches to its host tower(s) whatever `towers`
    says (so two tower choices that both hold them train the same model). Used to drop duplicate sweep points."""
    spec = get_method(method)
    if spec.peft not in ("prefix", "prompt"):
        return list(towers) if towers else None
    if family is None:
        from raymed.models import resolve

        family = resolve(model).family.name
    candidates = PREFIX_TOWERS[family] if spec.peft == "prefix" else (PROMPT_TOWER[family],)
    hosts = [t for t in candidates if not towers or t in towers]
    return hosts or list(towers or [])
