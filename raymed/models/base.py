"""What every model family knows: its towers, its parameter groups, and how to load it.

A parameter's *group* is decided by the type of the module that owns it and by that module's position
(the nearest enclosing attention / FFN / embedding block), never by loose substrings of its name:
in BERT/BLIP `attention` also matches `crossattention` and `attention.output.LayerNorm`, and
`output.dense` is both the FFN output and the attention output projection (docs/DESIGN.md §2.4).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

GROUPS: tuple[str, ...] = ("ln", "attn", "ffn", "embed", "head", "other")


class ModelLoadError(ValueError):
    """A model reference that cannot be resolved: unknown preset, missing path, not a model directory."""


@dataclass(frozen=True)
class Preset:
    """A named model: a config builder plus whether it has real (local, random or shipped) weights."""

    name: str
    family: str
    description: str
    build_config: Callable[[], Any]
    # `meta` presets are full-size architectures for accounting only (no weights, built in seconds).
    meta_only: bool = False
    # Directory with shipped weights + processor (relative to the package), if any.
    shipped_dir: str | None = None


@dataclass(frozen=True)
class ParamInfo:
    name: str
    tower: str
    group: str
    numel: int
    unused: bool


@dataclass
class Family:
    """A model family: towers, group tables, presets, loading and encoding.

    Subclasses fill the tables; the classification logic here is shared.
    """

    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values this family loads
    towers: Mapping[str, tuple[str, ...]]  # tower -> parameter-name prefixes
    attn_modules: frozenset[str]  # module class names whose Linear children are attention projections
    ffn_modules: frozenset[str]  # module class names whose Linear children are the FFN
    embed_modules: frozenset[str]  # embedding blocks (patch/position/token embeddings)
    head_prefixes: tuple[str, ...]  # output heads (LM head, BLIP's prediction head)
    presets: dict[str, Preset] = field(default_factory=dict)
    peft_task_type: str | None = None

    # ---- classification ------------------------------------------------------------------------
    def tower_of(self, name: str) -> str:
        for tower, prefixes in self.towers.items():
            if any(name.startswith(p) for p in prefixes):
                return tower
        raise KeyError(f"parameter {name!r} belongs to no tower of family {self.name!r}")

    @staticmethod
    def is_norm(module: nn.Module) -> bool:
        # LLaMA/Mistral norms are RMSNorm classes that do not subclass nn.LayerNorm.
        return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")

    def group_of_module(self, path: Sequence[nn.Module], name: str) -> str:
        """Group of the parameters owned directly by ``path[-1]``; ``path`` is the chain from the root."""
        owner = path[-1]
        if self.is_norm(owner):
            return "ln"
        if any(name.startswith(p) for p in self.head_prefixes):
            return "head"
        if isinstance(owner, nn.Embedding):
            return "embed"
        for module in reversed(path):
            cls = type(module).__name__
            if cls in self.attn_modules:
                return "attn"
            if cls in self.ffn_modules:
                return "ffn"
            if cls in self.embed_modules:
                return "embed"
        return "other"

    def unused_parameters(self, model: nn.Module) -> set[str]:
        """Parameters that take no part in the forward pass (never trainable)."""
        return set()

    def classify(self, model: nn.Module) -> list[ParamInfo]:
        """Every (deduplicated) parameter of ``model`` with its tower and group."""
        unused = self.unused_parameters(model)
        infos: list[ParamInfo] = []
        seen: set[int] = set()
        for mod_name, path in _walk(model):
            for pname, p in path[-1].named_parameters(recurse=False):
                if id(p) in seen:  # tied weights count once, under their first owner
                    continue
                seen.add(id(p))
                full = f"{mod_name}.{pname}" if mod_name else pname
                infos.append(
                    ParamInfo(full, self.tower_of(full), self.group_of_module(path, full),
                              int(getattr(p, "ds_numel", 0) or p.numel()), full in unused)  # ZeRO-3: ds_numel
                )
        return infos

    # ---- loading -------------------------------------------------------------------------------
    model_class: ClassVar[Any] = None  # the transformers model class of the family (set by subclasses)
    processor_class: ClassVar[Any] = None

    def build(self, preset: Preset, device: str = "cpu", seed: int = 0) -> nn.Module:
        """A preset's model: on `meta` (accounting only), its shipped weights, or seeded random weights."""
        if device == "meta":
            with torch.device("meta"):
                return self.model_class(preset.build_config())
        if preset.shipped_dir:
            from raymed.pretrained import shipped_path

            return self.load_pretrained(shipped_path(preset.shipped_dir)).eval()
        cfg = preset.build_config()
        torch.manual_seed(seed)
        return self.model_class(cfg).eval()

    def load_pretrained(self, path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
        return self.model_class.from_pretrained(path, dtype=dtype, use_safetensors=True)

    def build_processor(self, preset: Preset) -> Any:
        """A preset's processor: the shipped one, or one built locally from the preset's config."""
        if preset.shipped_dir:
            from raymed.pretrained import shipped_path

            return self.load_processor(shipped_path(preset.shipped_dir))
        return self.new_processor(preset.build_config())

    def new_processor(self, config: Any) -> Any:
        """A processor (tokenizer + image processor) built locally for a model config."""
        raise NotImplementedError

    def load_processor(self, path: Path) -> Any:
        return self.processor_class.from_pretrained(path)

    def convert_original(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a checkpoint in the original release's naming to the transformers layout."""
        raise NotImplementedError

    # ---- data ----------------------------------------------------------------------------------
    def encode(
        self, processor: Any, rows: Mapping[str, Sequence[Any]], *, train: bool, max_length: int,
        template: str = "auto", image_aspect: str = "auto",
    ) -> dict[str, np.ndarray]:
        """Turn decoded rows (`image` PIL images, `question`, `answer`) into fixed-shape model inputs.

        ``train=True`` includes the answer as the target; ``train=False`` gives prompt-only inputs
        for generation. ``template`` (`model.template`) and ``image_aspect`` (`data.image_aspect`) choose the
        conversation template and pad-vs-crop preprocessing where the family has them.
        """
        raise NotImplementedError

    def cut_padding(self, processor: Any, batch: Mapping[str, Any], *, train: bool, multiple: int = 8) -> dict[str, Any]:
        """``batch`` (host arrays from `encode`) cut to its longest sample, rounded up to ``multiple`` columns
        (`raymed.data.padding`). Default: one prompt group (`attention_mask`, `input_ids`, `labels`), right-padded for
        training and left-padded for generation; pads are masked, so the loss and answers do not depend on the cut."""
        from raymed.data.padding import cut_columns

        return cut_columns(batch, "attention_mask", ("input_ids", "labels"), multiple)

    def eval_batch_size(self, processor: Any) -> int | None:
        """The questions per `generate` call the model's recipe fixes (None: the run's `train.eval_batch_size`)."""
        return None

    def generate(
        self, model: nn.Module, processor: Any, batch: Mapping[str, torch.Tensor], max_new_tokens: int, **kwargs: Any
    ) -> list[str]:
        """Answers (decoded text) for a prompt-only batch; `kwargs` go to `generate` (e.g. `synced_gpus`)."""
        raise NotImplementedError


def _walk(model: nn.Module) -> Iterator[tuple[str, list[nn.Module]]]:
    """(qualified name, chain of modules from the root) for every module, depth first."""

    def rec(prefix: str, chain: list[nn.Module]) -> Iterator[tuple[str, list[nn.Module]]]:
        yield prefix, chain
        for child_name, child in chain[-1].named_children():
            yield from rec(f"{prefix}.{child_name}" if prefix else child_name, [*chain, child])

    yield from rec("", [model])


def read_model_type(path: Path) -> str:
    """`model_type` of a local HF model directory, with errors a user can act on."""
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory (expected an HF model directory)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(
            f"{str(path)!r} is not a model directory: no config.json. Point --model at a directory written by "
            "save_pretrained, or convert an original checkpoint first (python -m raymed.models.convert)."
        )
    try:
        model_type = json.loads(cfg.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ModelLoadError(f"{cfg}: not a valid transformers config ({e})") from e
    return str(model_type)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, which needs no input that requires grad.

    So frozen first layers (an LN-only language tower behind a frozen vision tower) are fine, and the
    input-grad hook transformers adds for reentrant checkpointing is removed: on BLIP it marks the
    embedding output (a leaf) as requiring grad, and BLIP's in-place `embeddings += ...` then fails.
    A prefix-tuned model keeps its prefix under checkpointing (`prefix_cache`).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "disable_input_require_grads") and getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if getattr(module, "raymed_prefix_cache", False):  # `prefix_cache`: the replay reads what the forward read
            for layer in module.get_base_model().modules():
                if isinstance(layer, GradientCheckpointingLayer):
                    layer._can_checkpoint_with_cache = True


VISION_LAYER = re.compile(r"(^|\.)(vision_model|vision_tower)\.encoder\.layers\.(\d+)$")


def enable_drop_path(model: nn.Module, rate: float) -> int:
    """Stochastic depth in the vision tower (`model.drop_path`): layer i of n drops the output of its attention and of
    its MLP, per sample, with probability `rate * i / (n - 1)` while training (rescaling kept samples by 1 / keep),
    as BLIP's ViT (`drop_path_rate`, timm's `DropPath`). Forward hooks, so parameter names stay as they are; under
    activation checkpointing the replay draws the same masks (the RNG state is restored). Returns the hooked layers."""
    layers = [(int(m.group(3)), module) for name, module in model.named_modules() if (m := VISION_LAYER.search(name))]
    if not layers:
        raise ValueError("model.drop_path: no vision encoder layers (`vision_model.encoder.layers.N`) in this model")
    n = max(i for i, _ in layers) + 1
    for i, layer in layers:
        p = rate * i / max(n - 1, 1)
        if p > 0:
            for branch in (layer.self_attn, layer.mlp):
                branch.register_forward_hook(_drop_path_hook(p))
    return len(layers)


def _drop_path_hook(p: float) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training:
            return output
        x = output[0] if isinstance(output, tuple) else output
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p).div_(1.0 - p)
        return (x * keep, *output[1:]) if isinstance(output, tuple) else x * keep

    return hook


def prefix_cache(peft_model: nn.Module) -> None:
    """The KV cache through which peft's prefix tuning hands its prefix to the model, made right for training and for
    BERT-style layers (docs/DESIGN.md §10).

    - In training, each layer of the prefix cache is read-only: `update` returns prefix + the step's keys and values
      and stores nothing. A checkpointed layer's replay in backward then computes exactly what its forward did, so
      activation checkpointing may keep the cache (transformers drops it otherwise, and the prefix is lost; peft
      refuses the combination outright when checkpointing is on first).
    - BERT-style layers (MISS's question encoder) hand one cache to self- and cross-attention and split it only
      when caching is on: cross-attention would attend to the prefix and the question's own keys besides the
      image. Cross-attention gets a cache of its own that keeps nothing, as BLIP's `med.py` gives it none.
    Generation keeps peft's growing cache for self-attention.
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    get_prompt = peft_model.get_prompt
    cross_attends = any(hasattr(m, "crossattention") for m in peft_model.get_base_model().modules())

    def prompt(*args: Any, **kwargs: Any) -> Any:
        cache = get_prompt(*args, **kwargs)
        if peft_model.training:
            for layer in getattr(cache, "layers", None) or []:
                layer.update = _read_only_update(layer.keys, layer.values)
        if cross_attends and isinstance(cache, DynamicCache):
            cache = EncoderDecoderCache(cache, _keep_nothing_cache())
            cache.is_updated = _KeepNothing()
        return cache

    peft_model.get_prompt = prompt
    peft_model.raymed_prefix_cache = True


class _KeepNothing(dict):
    """`EncoderDecoderCache.is_updated` that never records a cross-attention layer as cached."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _keep_nothing_cache() -> Any:
    from transformers.cache_utils import DynamicCache

    class KeepNothingCache(DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return key_states, value_states

    return KeepNothingCache()


def _read_only_update(keys: torch.Tensor, values: torch.Tensor) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    return update
