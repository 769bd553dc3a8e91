"""`python -m raymed.tune [--config SWEEP.yaml] [--out DIR] [--resume] [key=value ...]`: a Ray Tune sweep.

Each trial is one training run of the recipe (a Tune function trainable that builds and fits the Ray Train
`TorchTrainer`; worker reports reach ASHA through `TuneReportCallback`). At the end, the comparison report
(`results.json`, `results.csv`, `report.md`, `frontier.png`) is written into the experiment folder.
With no `--config`, the built-in default sweep runs: tiny models on the synthetic Med-VQA data.

Sweep files: `train:` holds training-config keys (or `train_config:` names a training YAML), `search:`
maps dotted training keys to a list (grid) or `{loguniform: [lo, hi]}` / `{choice: [...]}` (sampled).
Dotted command-line overrides set training keys (`train.epochs=2`) or sweep keys (`sweep.metric=...`); one search
axis is `sweep.search.KEY=[...]` (e.g. `sweep.search.train.lr=[1e-4]`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from raymed import storage as store
from raymed.cluster import (ResourceError, capacity, check_resources, init_ray,
                            keep_worker_nodes_removable, required_cpus)
from raymed.config import (Config, ConfigError, Section, deep_merge, format_error, local_paths, parse_override, read_yaml,
                     set_dotted, validate)
from raymed.data.plan import eval_set_names
from raymed.eval.metrics import REPORT_KEYS, VQA_KEYS
from raymed.tracking import tune_callbacks
from raymed.train.launch import build_trainer, check_storage

DEFAULT_SWEEP = Path(__file__).parents[1] / "defaults" / "sweep.yaml"
VQA_METRICS = VQA_KEYS  # every scoring rule: strict, @llava-med, @miss
REPORT_METRICS = REPORT_KEYS  # report generation: BLEU-1..4, ROUGE-L, METEOR, CIDEr
TRAIN_METRICS = ("loss", "epoch", "step", "samples_per_s", "tokens_per_s", "peak_mem_mb")


class TestSetSelectionWarning(UserWarning):
    """A sweep chooses on the split it reports (test): its best scores are optimistic."""


class SchedulerConfig(Section):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: float = Field(2.0, gt=1)
    per: str | list[str] | None = None
    """Search key(s) (e.g. `method.name`, or `[method.name, method.towers]`): ASHA compares each trial only with
    the trials that share their values (one ASHA per method: it stops a method's weaker learning rates, never a
    slow-starting method)."""


class SweepConfig(Section):
    name: str = "sweep"
    train: dict[str, Any] = Field(default_factory=dict)
    train_config: str | None = None
    search: dict[str, Any] = Field(default_factory=dict)
    metric: str = "eval/val/overall_acc"
    """What trials are ranked and ASHA-stopped on: a metric of the selection split (`data.select_split`), never of
    the split the report scores them on (`data.eval_split`: choosing on it is warned about, loudly)."""
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = SchedulerConfig()
    num_samples: int = Field(1, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    trial_cpus: float = Field(0.05, gt=0)
    """Logical CPUs of each trial's driver (it only waits on its TorchTrainer)."""


# ---- loading and validation (all before any trial starts) ---------------------------------------
def load_sweep(
    path: str | Path | None, overrides: list[str], check_paths: bool = True
) -> tuple[SweepConfig, dict[str, Any]]:
    """The sweep config and its base training-config dict (validated, with every grid point)."""
    path = Path(path) if path else DEFAULT_SWEEP
    raw = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        if key.startswith("sweep.search."):  # one search axis, named by its own dotted key (`sweep.search.train.lr`)
            raw = {**raw, "search": {**(raw.get("search") or {}), key[len("sweep.search."):]: value}}
        else:
            raw = set_dotted(raw, key[len("sweep."):] if key.startswith("sweep.") else f"train.{key}", value)
    try:
        sweep = SweepConfig.model_validate(raw)
    except Exception as e:  # pydantic.ValidationError
        errors = [format_error(err, SweepConfig) for err in e.errors()] if hasattr(e, "errors") else [str(e)]
        raise ConfigError([f"sweep {m}" for m in errors], str(path)) from None
    base = read_yaml(path.parent / sweep.train_config) if sweep.train_config else {}
    base = deep_merge(base, sweep.train)
    check_sweep(sweep, base, str(path), check_paths)
    return sweep, base


def _space(sweep: SweepConfig) -> tuple[dict[str, list], dict[str, Any]]:
    """(grid axes, sampled axes) of the search space."""
    grid, sampled = {}, {}
    for key, value in sweep.search.items():
        if isinstance(value, list):
            grid[key] = value
        elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("loguniform", "uniform", "choice"):
            sampled[key] = value
        else:
            raise ConfigError([f"search.{key}: expected a list (grid) or one of {{loguniform|uniform|choice: [...]}}, "
                               f"got {value!r}"])
    return grid, sampled


def points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every grid point (sampled axes at a representative value) as dotted overrides."""
    grid, sampled = _space(sweep)
    reps = {k: (v.get("choice") or v.get("loguniform") or v.get("uniform"))[0] for k, v in sampled.items()}
    keys = list(grid)
    return [{**dict(zip(keys, combo)), **reps} for combo in itertools.product(*grid.values())]


def expected_metrics(cfg: Config, eval_sets: list[str]) -> set[str]:
    """Every metric name a trial of `cfg` can report."""
    names = set(TRAIN_METRICS) | {"trainable", "total_params"}
    for s in eval_sets:
        for prefix in ("eval", "zeroshot"):
            names |= {f"{prefix}/{s}/{m}" for m in (*VQA_METRICS, *REPORT_METRICS)}
    return names


def check_sweep(sweep: SweepConfig, base: dict[str, Any], source: str, check_paths: bool = True) -> None:
    """Every problem with the search space and metric, at once, before any trial starts."""
    errors: list[str] = []
    if not sweep.search:
        errors.append("search: the search space is empty; give at least one key, e.g. search: {method.name: [ln, lora]}")
    for key, value in sweep.search.items():
        if isinstance(value, list) and not value:
            errors.append(f"search.{key}: empty list: nothing to try")
    per = per_keys(sweep.scheduler)
    for key in per:
        if key not in sweep.search:
            errors.append(f"scheduler.per: {key!r} is not a search key; search keys: {', '.join(sweep.search) or 'none'}")
    if per and sweep.scheduler.type != "asha":
        errors.append(f"scheduler.per applies to ASHA only (scheduler.type is {sweep.scheduler.type!r})")
    if errors:
        raise ConfigError(errors, source)
    base_cfg = validate(base, source, check_paths)
    warmup_epochs = base_cfg.train.warmup_ratio * base_cfg.train.epochs
    if sweep.scheduler.type == "asha" and sweep.scheduler.grace_period > base_cfg.train.epochs:
        errors.append(f"scheduler.grace_period: {sweep.scheduler.grace_period} epochs, but trials train "
                      f"train.epochs={base_cfg.train.epochs}: ASHA could never judge a trial; lower the grace period "
                      "(or use scheduler.type fifo)")
    elif sweep.scheduler.type == "asha" and sweep.scheduler.grace_period <= warmup_epochs:
        errors.append(f"scheduler.grace_period: {sweep.scheduler.grace_period} epoch(s) would judge trials during the "
                      f"learning-rate warm-up ({warmup_epochs:g} epochs = train.warmup_ratio x train.epochs); use a "
                      "grace period past it")
    reported: set[str] = set()
    for point in points(sweep):
        data = base
        for key, value in point.items():
            data = set_dotted(data, key, value)
        try:
            cfg = validate(data, source, check_paths)
        except ConfigError as e:
            errors += [f"search point {point}: {m}" for m in e.errors if m not in errors]
            continue
        reported |= expected_metrics(cfg, eval_set_names(cfg))
    if not errors and sweep.metric not in reported:
        errors.append(f"metric {sweep.metric!r} is reported by no trial; trials report: "
                      + ", ".join(sorted(m for m in reported if not m.startswith("zeroshot/"))))
    if errors:
        raise ConfigError(sorted(set(errors), key=errors.index), source)
    if sweep.metric.split("/")[:2] == ["eval", base_cfg.data.eval_split]:
        warnings.warn(f"{source}: metric {sweep.metric!r} chooses trials (and ASHA stops them) on the split they are "
                      f"scored on ({base_cfg.data.eval_split!r}): the best scores are then biased upwards. Choose on "
                      f"the selection split: metric: eval/{base_cfg.data.select_split or 'val'}/...",
                      TestSetSelectionWarning, stacklevel=2)


# ---- scheduling ----------------------------------------------------------------------------------
class GroupedScheduler(TrialScheduler):
    """One scheduler per group of trials (e.g. per method): each trial is only ever compared with its group.

    Built from public Ray Tune APIs alone: a `TrialScheduler` that hands each trial's events to its group's own
    scheduler (made by `make`, e.g. an `AsyncHyperBandScheduler`), and picks the next trial to run as FIFO does.
    """

    def __init__(self, keys: tuple[str, ...], make: Any) -> None:
        super().__init__()
        self.keys, self.make = keys, make
        self.groups: dict[str, TrialScheduler] = {}
        self.group_of: dict[str, str] = {}
        self.fifo = FIFOScheduler()
        self._mode: str | None = None

    def group(self, trial: Any) -> str:
        point = {**trial.config.get("grid", {}), **trial.config.get("sampled", {})}
        return " | ".join(f"{k}={point.get(k)}" for k in self.keys)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return all(g.set_search_properties(metric, mode, **spec) for g in self.groups.values())

    def _scheduler(self, trial: Any) -> TrialScheduler:
        return self.groups[self.group_of[trial.trial_id]]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        name = self.group(trial)
        if name not in self.groups:
            self.groups[name] = self.make()
            self.groups[name].set_search_properties(self._metric, self._mode)
        self.group_of[trial.trial_id] = name
        self.groups[name].on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._scheduler(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._scheduler(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._scheduler(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._scheduler(trial).on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        return self.fifo.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return f"one scheduler per {', '.join(self.keys)}:\n" + "\n".join(
            f"[{name}] {g.debug_string()}" for name, g in self.groups.items())

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class _ASHA:
    """A picklable factory of Ray's ASHA with fixed settings (one per group)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __call__(self) -> TrialScheduler:
        return AsyncHyperBandScheduler(**self.kwargs)


def make_scheduler(sweep: SweepConfig, max_t: int) -> TrialScheduler:
    """Tune's scheduler for the sweep: FIFO, Ray's ASHA, or ASHA per group of `scheduler.per` values."""
    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    asha = _ASHA(time_attr="epoch", max_t=max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if not s.per:
        return asha()
    return GroupedScheduler(per_keys(s), asha)


def per_keys(s: SchedulerConfig) -> tuple[str, ...]:
    return (s.per,) if isinstance(s.per, str) else tuple(s.per or ())


# ---- the trial -----------------------------------------------------------------------------------
def trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one run of the recipe on a Ray Train `TorchTrainer`.

    The run's result row is written by its workers into every checkpoint (raymed.tune.results), so a trial that ASHA
    stops still has one; a trial that fails leaves `raymed-error.json` beside its checkpoints.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymed.tune.results import run_completed, write_error

    data = config["base"]
    for key, value in {**config["grid"], **config["sampled"]}.items():
        data = set_dotted(data, key, value)
    trial_name = f"trial-{ray.tune.get_context().get_trial_id()}"
    data = set_dotted(data, "run.name", trial_name)
    try:
        # The sweep's driver validated every grid point and made its relative paths absolute (`config["paths"]`):
        # a trial runs in its own folder, where the user's relative paths mean nothing.
        cfg = validate(data, trial_name, check_paths=False)
        trainer = build_trainer(cfg, storage=config["storage"], extra_callbacks=[TuneReportCallback()], track=False,
                                paths=config["paths"])
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as err:
        run_dir = store.join(config["storage"], trial_name)
        if run_completed(run_dir):  # Tune ended the trial on its last report (ASHA's max_t): nothing failed
            return
        write_error(run_dir, err)
        raise


def _search_space(sweep: SweepConfig, base: dict[str, Any]) -> dict[str, Any]:
    """Tune's param space: the grid as one list of distinct points (see `grid_points`), sampled axes apart."""
    from ray import tune

    _, sampled = _space(sweep)
    space: dict[str, Any] = {"grid": tune.grid_search(grid_points(sweep, base))}
    space["sampled"] = {}
    for key, spec in sampled.items():
        kind, args = next(iter(spec.items()))
        space["sampled"][key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return space


def grid_points(sweep: SweepConfig, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's points, without those that train the same model as an earlier one: a prompt-learning method
    (prefix, prompt) attaches to one tower whatever `method.towers` says, so it runs once per tower choice that
    contains that tower, not once per choice."""
    from raymed.models.methods import effective_towers

    grid, _ = _space(sweep)
    out, seen = [], set()
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        data = base
        for key, value in point.items():
            data = set_dotted(data, key, value)
        cfg = validate(data, check_paths=False)
        key = json.dumps({**point, "method.towers": effective_towers(cfg.model.name, cfg.model.family,
                                                                     cfg.method.name, cfg.method.towers)},
                         sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(point)
    return out


def trial_cpus(base_cfg: Config, sweep: SweepConfig) -> float:
    return sweep.trial_cpus + required_cpus(base_cfg)


def concurrent_trials(cluster: dict[str, float], base_cfg: Config, sweep: SweepConfig) -> int:
    """Trials the cluster holds at once: by CPUs, and by GPUs (fractional GPUs pack several on one)."""
    n = int(cluster.get("CPU", 0) // trial_cpus(base_cfg, sweep))
    if base_cfg.scaling.use_gpu and cluster.get("GPU"):
        n = min(n, int(cluster["GPU"] / (base_cfg.scaling.min_workers * base_cfg.scaling.gpus_per_worker) + 1e-9))
    return max(1, n)


def trial_concurrency(cluster: dict[str, float], base_cfg: Config, sweep: SweepConfig) -> tuple[int, str | None]:
    """Trials run at once: `sweep.max_concurrent`, at most what the cluster holds (more trials than the CPUs hold
    starve each other's data tasks, and the sweep hangs). `cluster`: `Capacity.totals`, which on an autoscaling
    cluster is what its node types hold at their `max_workers`: Tune keeps that many trials pending, and the
    autoscaler launches nodes for them."""
    fits = concurrent_trials(cluster, base_cfg, sweep)
    if not sweep.max_concurrent:
        return fits, None
    if sweep.max_concurrent <= fits:
        return sweep.max_concurrent, None
    return fits, (f"sweep.max_concurrent={sweep.max_concurrent}: the cluster holds {fits} trial(s) at once "
                  f"({cluster.get('CPU', 0):g} CPUs, {trial_cpus(base_cfg, sweep):g} per trial); running {fits}")


def sweep_paths(sweep: SweepConfig, base: dict[str, Any]) -> dict[str, str]:
    """The relative local paths of the base config and of every grid point, made absolute from here (the driver's
    directory; `config.local_paths`)."""
    cfgs = [validate(base)]
    for point in grid_points(sweep, base):
        data = base
        for key, value in point.items():
            data = set_dotted(data, key, value)
        cfgs.append(validate(data))
    return local_paths(cfgs)


def run_sweep(sweep: SweepConfig, base: dict[str, Any], out: str | Path, resume: bool = False) -> Any:
    """Run (or resume) the sweep in `out` (a folder or URI); returns Tune's ResultGrid."""
    from ray import tune

    base_cfg = validate(base)
    out = store.resolve(out)
    check_storage(base_cfg, store.join(out, sweep.name, "runs"))
    need = trial_cpus(base_cfg, sweep)
    init_ray(2 * need)  # a local cluster runs two trials side by side
    cap = capacity()
    if cap.totals.get("CPU", 0) < need:
        raise ResourceError(f"each trial needs {need:g} CPUs (driver {sweep.trial_cpus:g} + "
                            f"{base_cfg.scaling.min_workers} workers x {base_cfg.scaling.cpus_per_worker:g} + data) "
                            f"but the cluster holds at most {cap.describe()}; lower scaling.cpus_per_worker or "
                            "num_workers" + cap.refusal_note())
    keep_worker_nodes_removable(check_resources(base_cfg, cap))
    if base_cfg.scaling.use_gpu and not cap.totals.get("GPU"):
        raise ResourceError(f"scaling.use_gpu=true but the cluster has no GPU and its autoscaler can launch none "
                            f"({cap.describe()})")
    if cap.autoscaling:
        print(f"autoscaling cluster: trials are sized to {cap.describe()}; the autoscaler launches nodes for "
              "pending trials", file=sys.stderr)
    concurrency, note = trial_concurrency(cap.totals, base_cfg, sweep)
    if note:
        print(note, file=sys.stderr)
    trainable = tune.with_resources(trial, {"cpu": sweep.trial_cpus})
    storage, fs = store.ray_storage(out)
    experiment = f"{storage}/{sweep.name}"
    if resume:
        if not tune.Tuner.can_restore(experiment, storage_filesystem=fs):
            raise ConfigError([f"--resume: no sweep to resume at {store.join(out, sweep.name)}"])
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        epochs = base_cfg.train.epochs
        scheduler = make_scheduler(sweep, epochs)
        tuner = tune.Tuner(
            trainable,
            param_space={"base": base, **_search_space(sweep, base), "storage": store.join(out, sweep.name, "runs"),
                         "paths": sweep_paths(sweep, base)},
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                        num_samples=sweep.num_samples, max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage, storage_filesystem=fs,
                                      callbacks=tune_callbacks(base_cfg.run.report_to, sweep.name,
                                                               Path(store.join(out, sweep.name)))),
        )
    print(f"[raymed] sweep {sweep.name}: {len(grid_points(sweep, base)) * sweep.num_samples} trials, "
          f"{concurrency} at a time, metric {sweep.metric} ({sweep.mode}) -> {out}", flush=True)
    return tuner.fit()


def mark_stopped(results: Any, runs_dir: str | Path, epochs: int) -> None:
    """Record, in each trial's run folder, the epoch at which the scheduler stopped it: its workers may go on for a
    moment and checkpoint a later epoch, which the trial's result row must not count (raymed.tune.results)."""
    from raymed.tune.results import write_stopped

    for r in results:
        m = r.metrics or {}
        if r.error is None and m.get("epoch") and m["epoch"] < epochs and m.get("trial_id"):
            write_stopped(store.join(runs_dir, f"trial-{m['trial_id']}"), int(m["epoch"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help=f"sweep YAML (default: the built-in {DEFAULT_SWEEP.name})")
    ap.add_argument("--out", help="experiment folder or URI: s3://BUCKET/PREFIX, gs://... (default: the sweep's "
                    "run.storage when it sets one, else ./experiments)")
    ap.add_argument("--resume", action="store_true", help="resume an interrupted sweep in --out")
    ap.add_argument("overrides", nargs="*", help="dotted overrides: training keys, or sweep.KEY=VALUE")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after --out / --resume
    from raymed.tune.report import build_report

    try:
        sweep, base = load_sweep(args.config, args.overrides)
        root = args.out or base.get("run", {}).get("storage") or "experiments"
        out = store.join(store.resolve(root), sweep.name)
        results = run_sweep(sweep, base, root, resume=args.resume)
    except (ConfigError, ResourceError, store.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from raymed.tune.results import read_result_rows

    runs = store.join(out, "runs")
    mark_stopped(results, runs, validate(base).train.epochs)
    rows = read_result_rows(runs) if store.is_dir(runs) else []  # the same rows `python -m raymed.tune.report` reads back
    failed = sum(r.error is not None for r in results)
    if not rows:
        print(f"error: all {len(results)} trial(s) failed, none reported a result ({out}):\n"
              + failure_lines(results, runs), file=sys.stderr)
        return 1
    paths = build_report(rows, out, metric=sweep.metric, mode=sweep.mode)
    print(store.read_text(paths["report_md"]))
    print(f"[raymed] report: {', '.join(str(p) for p in paths.values())}")
    if failed:
        print(f"warning: {failed} of {len(results)} trial(s) failed:\n" + failure_lines(results, runs), file=sys.stderr)
    return 0


def failure_lines(results: Any, runs_dir: str) -> str:
    """One line per distinct error of the failed trials, with how many failed so: the error each trial recorded
    (`raymed-error.json`), else the last line of Ray's error."""
    from raymed.tune.results import read_errors

    errors = list(read_errors(runs_dir).values()) if store.is_dir(runs_dir) else []
    if not errors:
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error is not None]
    counts = Counter(errors)
    return "\n".join(f"  - {n} trial(s): {e}" for e, n in counts.items())
