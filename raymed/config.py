"""Typed run configuration: YAML files hold only what differs from these defaults.

Files may `inherit:` others (paths relative to the file, applied first). Dotted overrides
(`train.lr=1e-4`, `method.towers=[language]`) use the same keys as Tune search spaces. Unknown keys,
wrong types and impossible values are all reported at once, each naming its key.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator


class ConfigError(ValueError):
    """One or more configuration errors, each naming its key."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors, self.source = list(errors), source
        super().__init__(f"{len(errors)} error(s) in {source}:\n" + "\n".join(f"  - {e}" for e in errors))

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray (and pickle) rebuild an exception as `cls(*args)`; args here is the message, not the error list.
        return type(self), (self.errors, self.source)


class Section(BaseModel):
    """A config section: unknown keys are errors, values frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    name: str = "tiny-llava"
    """Preset name (`python -m raymed.models.params --list`) or a local HF model directory."""
    family: Literal["llava", "miss"] | None = None
    """Family of a model directory, to validate configs before the directory exists (e.g. on a laptop)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant: works when the first layers are frozen)."""
    template: Literal["auto", "plain", "llava-med-v1.5", "llava-med-v1.0"] = "auto"
    """LLaVA conversation template for training, evaluation and inference. auto: the model directory's chat
    template (a converted LLaVA-Med v1.5 carries `[INST] <image>\n{q} [/INST]`), else `plain` (the tiny presets)."""
    drop_path: float = Field(0.0, ge=0, lt=1)
    """Stochastic depth in the vision tower while training: of its n layers, layer i skips its attention and MLP
    branches (per sample) with probability `drop_path * i / (n - 1)`, BLIP's / timm's rule. The MISS authors fine-tune
    with 0.1 (configs/models/miss-original.yaml); 0: off. Evaluation never drops."""


class MethodConfig(Section):
    name: str = "ln"
    """Method (`full`, `ln`, `attn`, `ffn`, `ln+attn`, `lora`, `ia3`, `prefix`, `prompt`, `peft-ln`, ...)."""
    towers: list[str] | None = None
    """Towers the method applies to (default: all)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """peft options overriding the method's defaults (e.g. `r: 16`)."""


class DataConfig(Section):
    path: str | None = None
    """Prepared data directory (`python -m raymed.data prepare`); None: the built-in synthetic Med-VQA."""
    train_split: str = "train"
    eval_split: str = "test"
    """The split runs are scored and reported on, every epoch; a sweep never chooses on it (`select_split`)."""
    select_split: str | None = "val"
    """Split of the training data evaluated every epoch beside `eval_split`, to choose on: sweeps rank trials and
    ASHA stops them on `eval/<select_split>/...` (`raymed data prepare` writes a `val` split into every dataset).
    None: no selection split (a sweep then has only `eval_split` to rank on, and says so)."""
    eval_sets: dict[str, str] = Field(default_factory=dict)
    """Extra prepared directories evaluated on their `eval_split` (e.g. out-of-distribution), by name."""
    image_aspect: Literal["auto", "pad", "crop"] = "auto"
    """LLaVA preprocessing of non-square images: pad to a square with the image mean colour, then resize (LLaVA-1.5
    and LLaVA-Med); or resize the short side and centre-crop (loses `1 - short/long` of the long axis). auto: the
    processor's `do_pad` (the tiny presets crop, as they were pretrained), pad otherwise."""
    max_length: int = Field(64, ge=8, le=8192)
    """Truncation limit of model inputs in tokens (LLaVA: prompt incl. image tokens + answer). Batches are cut to
    their longest sample (`pad_to_multiple_of`), so a larger limit costs nothing on shorter data."""
    pad_to_multiple_of: int = Field(8, ge=1, le=512)
    """Each batch (training and generation) is padded to its longest sample rounded up to this many tokens (8: tensor
    cores); 1: exactly the longest. Pads are masked, so it does not change what a run computes."""
    group_by_length: bool = False
    """Training batches of samples of similar length (less padding): each epoch's seeded order is cut into groups of
    `GROUP_BATCHES` batches, each group sorted by length, and the full batches shuffled (`raymed.data.epochs`).
    Deterministic per (seed, epoch), so a resumed run trains on the same batches. It changes the batches: part of
    the run's config."""
    synth_n: int = Field(400, ge=10)
    """Images in the built-in synthetic dataset (3 questions each)."""
    synth_style: str = "base"
    synth_ood_style: str | None = "shifted"
    """Style of the built-in out-of-distribution eval set (None: no OOD set)."""
    max_eval_rows: int | None = Field(None, ge=1)
    preprocess_actors: int = Field(1, ge=0)
    """Ray Data actors that decode + encode; 0: Ray tasks (no actor start-up, encoder cached per process)."""
    preserve_order: bool = True
    """Training batches in file order (Ray Data's `preserve_order`): runs are reproducible for a seed. False:
    blocks in completion order (can be faster when reads or decodes are uneven; the order then varies)."""
    shuffle: bool = True
    """Train on every epoch's rows in a fresh order, seeded by (train.seed, epoch): reproducible, and a resumed
    epoch sees the order it would have seen (raymed/data/epochs.py). False: file order (pre-shuffled data)."""
    cache_mb: int = Field(2048, ge=0)
    """Per worker: keep the encoded training batches in memory after the first epoch when they fit in this many
    MiB, and replay them in later epochs (no per-epoch restart of the Ray Data pipeline, no re-decoding).
    Larger shards stream every epoch; 0 always streams."""


class TrainConfig(Section):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    """Micro-batch size per worker."""
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    decay_norms_and_biases: bool = False
    """Apply `weight_decay` to norm weights and biases too (the MISS authors' AdamW decays every parameter); false:
    only weight matrices decay (the usual transformers recipe), so `ln` then trains without decay."""
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "cosine-per-epoch"] = "cosine"
    """Learning rate: linear warm-up then cosine to 0 per optimizer step; `cosine-per-epoch`: the cosine's value at
    each epoch's start held for the whole epoch, `lr * (1 + cos(pi * epoch / epochs)) / 2` (the MISS authors'
    `cosine_lr_schedule`, called once per epoch; use with `warmup_ratio: 0`)."""
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 0
    zero_shot: bool = True
    """Evaluate before any training (the zero-shot baseline)."""
    eval_every: int = Field(1, ge=1)
    """Evaluate every N epochs (and always after the last)."""
    eval_batch_size: int = Field(16, ge=1)
    """Questions per generate call: 16 keeps a 7B model's KV cache near 1.4 GiB (bf16, ~620 prompt + 64 new
    tokens). Batches are cut from the eval rows in order, whatever the number of workers, and batched LLaVA generation
    answers as one question at a time does (fp32; tested), so this changes no answer. A MISS model's recipe fixes its
    own (MISS: 100, whose answers depend on the batch: BLIP's decoder attends to the question padding)."""
    max_new_tokens: int = Field(64, ge=1)
    """Answer tokens generated for VQA (generation stops earlier at end-of-sequence). Chosen from measured answer
    lengths (docs/scoring.md): dataset answers are 1-12 tokens; verbose zero-shot LLaVA-Med answers put their
    verdict in a first sentence of ~10-30 tokens. Report generation sets its own (configs/data/iu-xray.yaml: 100).
    A MISS model's recipe may fix its own length (MISS: 10 including [DEC])."""
    log_every: int = Field(10, ge=0)
    """Every N optimizer steps, rank 0 prints loss, lr, throughput and ETA and logs them to `run.report_to`
    (0: per epoch only)."""


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    """ZeRO-3 only: keep parameters on CPU."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    zero3_init: bool = True
    """ZeRO-3: partition the weights while `from_pretrained` loads them (transformers' HfDeepSpeedConfig /
    deepspeed.zero.Init), so no rank holds the whole model. false: every rank loads it whole first (the earlier
    behaviour, kept for `python -m raymed.bench load`)."""
    shard_single_worker: bool = False
    """ZeRO partitions across workers; one fp32 worker has nothing to partition, and stages 1-3 then only add
    flat fp32 copies of weights and gradients (profiled: +0.6 s on a 2.6 s CPU step of a 56 M model). So a
    1-worker fp32 run without offload uses stage 0 (logged, and reported as `zero_stage`) unless this is true."""


class ScalingConfig(Section):
    num_workers: int | tuple[int, int] = 2
    """Training workers: a number, or `[min, max]` for an elastic run (spot capacity, docs/cluster.md): Ray Train
    starts as many as the cluster has room for (at least min), continues with fewer when a node is lost (a restart
    from the last checkpoint, counted in `run.max_failures`) and grows back up to max when capacity returns. Its
    checkpoints restore at any world size (weights and optimizer state re-sharded, raymed.train.elastic)."""
    resize_interval_s: float = Field(60.0, ge=0)
    """Elastic runs: how often (seconds) a healthy worker group checks whether more workers fit now (a resize
    restarts it from the last checkpoint)."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    """GPUs each worker asks Ray for (with use_gpu). A fraction packs single-worker trials onto one GPU (0.25:
    four `ln` / `lora` trials of a big frozen model share it); refused for multi-worker runs."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the workers: PACK (fewest nodes), SPREAD / STRICT_SPREAD (one worker per node)."""

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_range(cls, value: Any) -> int | tuple[int, int]:
        shape = "a number of workers, or [min, max] for an elastic run"
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{shape} (two whole numbers)")
            value = tuple(value)
        elif not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(shape)
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1:
            raise ValueError("at least 1 worker" + ("" if isinstance(value, int) else " (min of [min, max])"))
        if low > high:
            raise ValueError(f"[min, max] with min {low} > max {high}")
        return value

    @property
    def elastic(self) -> bool:
        """`num_workers: [min, max]`: Ray Train's elastic worker group."""
        return not isinstance(self.num_workers, int)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class RunConfig(Section):
    name: str | None = None
    """Run name; re-running with the same name resumes from its last checkpoint. Default: from the config hash."""
    storage: str = "runs"
    """Local directory or URI (s3://, gs://) shared by all nodes."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts after a crash (-1: unlimited); each resumes from the last checkpoint."""
    keep_checkpoints: int = Field(2, ge=1)
    fail_at_step: int | None = Field(None, ge=1)
    """Fault injection for tests: the last worker dies once at this optimizer step."""
    save_full_model: bool = False
    """Also save every parameter (gathered) in the last checkpoint: `model/full.safetensors` (debugging, audits)."""
    metrics_export: bool = True
    """Export training metrics with ray.util.metrics (Ray dashboard / Prometheus)."""
    allow_config_change: bool = False
    """Resume a run (same `run.name`) although its config changed. Without it such a resume is refused, naming
    each changed key. With it, a changed schedule continues from the lr reached (never re-stretched)."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers (offline by default: TensorBoard event files, MLflow `file:` store, W&B offline)."""


class Config(Section):
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    _written: dict[str, Any] | None = PrivateAttr(default=None)

    @property
    def bf16(self) -> bool:
        """Whether the run trains in bf16 (`deepspeed.precision` bf16, or auto on GPU); else fp32. Evaluation and export
        of its checkpoints load the model in the same precision."""
        return self.deepspeed.precision == "bf16" or (self.deepspeed.precision == "auto" and self.scaling.use_gpu)

    def as_written(self) -> dict[str, Any]:
        """The config as the user wrote it (relative paths kept): what a run stores, names itself after and compares
        on resume. `with_paths` gives the workers absolute paths; this stays what the command line said."""
        return copy.deepcopy(self._written) if self._written is not None else self.model_dump(mode="json")

    def hash(self) -> str:
        """Hash of everything that affects the result: the config as the user wrote it, without the
        result-neutral keys (`RESULT_NEUTRAL_KEYS`, the same list a resume ignores)."""
        d = self.as_written()
        for key in RESULT_NEUTRAL_KEYS:
            section, name = key.split(".", 1)
            d[section].pop(name, None)
        # Keys added later count only when set, so earlier runs keep their hashes (names, resumes, provenance).
        for section, key, default in (("model", "template", "auto"), ("data", "image_aspect", "auto"),
                                      ("deepspeed", "zero3_init", True)):
            if d[section].get(key) == default:
                del d[section][key]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def run_name(self) -> str:
        return self.run.name or f"{self.method.name}-{self.hash()}"


# Keys that do not change what a run computes: left out of the run hash (so of the default run name), and a run
# may resume with other values. Where and how the workers run, what is logged, how checkpoints are kept.
RESULT_NEUTRAL_KEYS = frozenset({
    "run.name", "run.storage", "run.metrics_export", "run.max_failures", "run.keep_checkpoints", "run.fail_at_step",
    "run.save_full_model", "run.allow_config_change", "run.report_to",
    "data.preprocess_actors", "data.pad_to_multiple_of", "train.eval_batch_size", "train.log_every",
    "scaling.cpus_per_worker", "scaling.gpus_per_worker", "scaling.placement_strategy", "scaling.resize_interval_s",
})


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every key of two config dumps that differs (and matters on resume)."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and path not in ("method.options",):
            out += config_changes(a, b, f"{path}.")
        elif a != b and path not in RESULT_NEUTRAL_KEYS:
            out.append(f"{path}: {a!r} in the checkpoint, {b!r} now")
    return out


# ---- local paths: made absolute once, on the driver ------------------------------------------------
def _path_values(cfg: Config) -> list[str]:
    """The values of `cfg` that may be local paths: the model directory, the data and eval-set folders."""
    return [v for v in (cfg.model.name, cfg.data.path, *cfg.data.eval_sets.values()) if v]


def local_paths(cfgs: Iterable[Config], cwd: str | Path | None = None) -> dict[str, str]:
    """Every relative local path the configs name (`model.name`, `data.path`, `data.eval_sets`) -> its absolute
    path from `cwd` (default: here). Resolved once, on the driver: Ray workers and Tune trials run in other
    directories, and must not re-read the user's relative paths there."""
    from raymed.models import PRESETS
    from raymed.models.sources import is_hub_id

    cwd = Path(cwd or Path.cwd())
    out: dict[str, str] = {}
    for cfg in cfgs:
        for value in _path_values(cfg):
            if value.startswith("hf://datasets/") and value not in out:  # prepared once, cached by commit
                out[value] = _hf_dataset(value)
                continue
            local = Path(value).expanduser()
            if value in PRESETS or "://" in value or local.is_absolute() or value in out:
                continue
            if (cwd / local).exists():
                out[value] = str((cwd / local).resolve())
        if cfg.model.name not in out and cfg.model.name not in PRESETS and is_hub_id(cfg.model.name):
            out[cfg.model.name] = _pinned(cfg.model.name)  # every node loads the revision resolved here
    return out


def _pinned(name: str) -> str:
    """A Hub model id with its commit (`raymed.models.sources.pin`); resolving errors are config errors."""
    from raymed.models import ModelLoadError
    from raymed.models.sources import pin

    try:
        return pin(name)
    except ModelLoadError as err:
        raise ConfigError([f"model.name: {err}"]) from None


def _hf_dataset(uri: str) -> str:
    """The prepared local folder of a ``hf://datasets/...`` data path (`raymed.data.hf.prepared_folder`)."""
    from raymed.data.hf import prepared_folder

    try:
        return str(prepared_folder(uri))
    except (ValueError, FileNotFoundError) as err:  # HubDatasetError, BadRowsError, no data files
        raise ConfigError([f"data.path {uri}: {err}"]) from None


def with_paths(cfg: Config, paths: Mapping[str, str]) -> Config:
    """`cfg` with the relative paths of `local_paths` replaced by their absolute ones, for the workers; its
    `as_written()` (hash, run name, stored config, resume comparison) stays the user's."""
    written = cfg.as_written()
    data = cfg.model_dump(mode="json")
    data["model"]["name"] = paths.get(data["model"]["name"], data["model"]["name"])
    if data["data"]["path"] is not None:
        data["data"]["path"] = paths.get(data["data"]["path"], data["data"]["path"])
    data["data"]["eval_sets"] = {k: paths.get(v, v) for k, v in data["data"]["eval_sets"].items()}
    out = Config.model_validate(data)
    out._written = written
    return out


# ---- loading ------------------------------------------------------------------------------------
def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its `inherit:` files merged underneath it."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError([f"inherit cycle: {' -> '.join(map(str, (*_seen, path)))}"], str(path))
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"], str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from e
    if not isinstance(data, dict):
        raise ConfigError(["top level must be a mapping"], str(path))
    merged: dict[str, Any] = {}
    for parent in data.pop("inherit", None) or []:
        merged = deep_merge(merged, read_yaml(path.parent / parent, (*_seen, path)))
    return deep_merge(merged, data)


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError([f"override {item!r} is not of the form key.path=value"])
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with `a.b.c` set to `value` (intermediate mappings created)."""
    out = copy.deepcopy(data)
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError([f"{key}: {p!r} is not a section"])
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def format_error(err: Mapping[str, Any], root: type[BaseModel] | None = None) -> str:
    """One pydantic validation error as a config error line: the dotted key, then what is wrong (for an unknown
    key, the keys its section allows; `root`: the validated model, `Config` by default)."""
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        section: type[BaseModel] = root or Config
        for part in err["loc"][:-1]:
            section = section.model_fields[str(part)].annotation  # type: ignore[assignment]
        return f"{loc}: unknown key; allowed: {', '.join(section.model_fields)}"
    value = err.get("input")
    return f"{loc}: {err['msg']} (got {value!r})"


def validate(data: Mapping[str, Any], source: str = "config", check_paths: bool = True) -> Config:
    """A Config, or a ConfigError listing every problem: schema first, then semantics."""
    errors: list[str] = []
    data = copy.deepcopy(dict(data))
    while True:  # drop each invalid key and retry, so semantic checks still see the valid rest
        try:
            cfg = Config.model_validate(data)
            break
        except ValidationError as e:
            errors += [format_error(err) for err in e.errors()]
            for err in e.errors():
                _drop(data, err["loc"])
    errors += semantic_errors(cfg, check_paths)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def _drop(data: dict[str, Any], loc: tuple[Any, ...]) -> None:
    node: Any = data
    for part in loc[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(loc[-1], None)
    elif len(loc) > 1:
        _drop(data, loc[:-1])


def semantic_errors(cfg: Config, check_paths: bool = True) -> list[str]:
    """Cross-field checks that need the model registry (cheap: no weights are loaded).

    `check_paths=False` skips the existence of model and data directories (validating shipped configs).
    """
    from raymed.models.methods import MethodError, check_towers, get_method
    from raymed.models import PRESETS, ModelLoadError, get_family, resolve

    errors = []
    family = None
    if not check_paths and cfg.model.name not in PRESETS:
        if cfg.model.family is None:
            errors.append(f"model.family: needed for model directory {cfg.model.name!r} (llava or miss)")
        else:
            family = get_family(cfg.model.family)
    else:
        try:
            ref = resolve(cfg.model.name)
            family = ref.family
            if ref.preset is not None and ref.preset.meta_only:
                errors.append(f"model.name: {cfg.model.name!r} is an accounting-only architecture; "
                              "train a converted checkpoint directory or a tiny preset")
            if cfg.model.family is not None and cfg.model.family != family.name:
                errors.append(f"model.family: {cfg.model.family!r} but {cfg.model.name!r} is a {family.name!r} model")
        except ModelLoadError as e:
            errors.append(f"model.name: {e}")
    try:
        get_method(cfg.method.name)
        if family is not None:
            check_towers(family, cfg.method.name, cfg.method.towers)
    except MethodError as e:
        errors.append(f"method: {e}")
    if family is not None and family.name != "llava":
        for key, value in (("model.template", cfg.model.template), ("data.image_aspect", cfg.data.image_aspect)):
            if value != "auto":
                errors.append(f"{key}: {value!r} applies to LLaVA models only ({cfg.model.name!r} is {family.name!r})")
    from raymed.data.synth import STYLES

    for key in ("synth_style", "synth_ood_style"):
        style = getattr(cfg.data, key)
        if style is not None and style not in STYLES:
            errors.append(f"data.{key}: unknown synthetic style {style!r}; known: {', '.join(STYLES)}")
    if cfg.data.select_split is not None and cfg.data.select_split == cfg.data.train_split:
        errors.append(f"data.select_split: {cfg.data.select_split!r} is the training split; choose on held-out data "
                      "(val), or null for none")
    for name in cfg.data.eval_sets:
        if name in (cfg.data.select_split, cfg.data.eval_split):
            errors.append(f"data.eval_sets.{name}: already the name of an eval set of the run (the training data's "
                          f"{'selection' if name == cfg.data.select_split else 'eval'} split); choose another name")
    if cfg.deepspeed.offload_param and cfg.deepspeed.zero_stage != 3:
        errors.append(f"deepspeed.offload_param: needs zero_stage 3 (got {cfg.deepspeed.zero_stage})")
    if cfg.deepspeed.precision == "bf16" and not cfg.scaling.use_gpu:
        errors.append("deepspeed.precision: bf16 needs scaling.use_gpu=true (CPU runs train in fp32)")
    if cfg.scaling.elastic and cfg.scaling.placement_strategy == "STRICT_SPREAD":
        errors.append("scaling.placement_strategy: STRICT_SPREAD with an elastic num_workers: Ray Train sizes an "
                      "elastic group by how many workers the nodes' free resources fit, not by the placement, so "
                      "after a node loss it would keep asking for one node per worker and never shrink; use PACK or "
                      "SPREAD (for one worker a node, size scaling.cpus_per_worker / gpus_per_worker so one fills "
                      "a node)")
    gpus = cfg.scaling.gpus_per_worker
    if gpus != int(gpus) and gpus > 1:
        errors.append(f"scaling.gpus_per_worker: {gpus:g}: more than one GPU per worker must be a whole number")
    elif gpus < 1 and cfg.scaling.use_gpu and cfg.scaling.max_workers > 1:
        errors.append(f"scaling.gpus_per_worker: {gpus:g} GPU per worker with {cfg.scaling.num_workers} workers: "
                      "fractional GPUs pack single-worker trials only (the ranks of an NCCL group cannot share a "
                      "GPU); use scaling.num_workers=1 or whole GPUs")
    if not check_paths:
        return errors
    from raymed.tracking import missing_packages

    errors += missing_packages(cfg.run.report_to)
    if cfg.data.path is not None and "://" not in cfg.data.path and not Path(cfg.data.path).exists():
        errors.append(f"data.path: {cfg.data.path!r} does not exist (run `python -m raymed.data prepare` first)")
    for name, path in cfg.data.eval_sets.items():
        if "://" not in path and not Path(path).exists():
            errors.append(f"data.eval_sets.{name}: {path!r} does not exist")
    return errors


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = (), check_paths: bool = True
) -> Config:
    """Defaults <- YAML file (with inherits) <- dotted overrides, validated."""
    data = read_yaml(Path(path)) if path else {}
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        data = set_dotted(data, key, value)
    return validate(data, str(path) if path else "config", check_paths)
