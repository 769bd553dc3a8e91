"""`python -m raymed.tune [--config SWEEP.yaml] [--out DIR] [--resume] [key=value ...]`: a Ray Tune sweep.

Each trial is one training run of the recipe (a Tune function trainable that builds and fits the Ray Train
`TorchTrainer`; worker reports reach ASHA through `TuneReportCallback`). At the end, the comparison report
(`results.json`, `results.csv`, `report.md`, `frontier.png`) is written into the experiment folder.
With no `--config`, the built-in default sweep runs: tiny models on the synthetic Med-VQA data.

Sweep files: `train:` holds training-config keys (or `train_config:` names a training YAML), `search:`
maps dotted training keys to a list (grid) or `{loguniform: [lo, hi]}` / `{choice: [...]}` (sampled).
Dotted command-line overrides set training keys (`train.epochs=2`) or sweep keys (`sweep.metric=...`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .config import Config, ConfigError, _Section, _format, deep_merge, parse_override, read_yaml, set_dotted, validate
from . import storage as store
from .train import ResourceError, build_trainer, check_storage, init_ray, required_cpus, summarize, write_result

DEFAULT_SWEEP = Path(__file__).parent / "defaults" / "sweep.yaml"
VQA_METRICS = ("closed_acc", "open_acc", "open_recall", "overall_acc", "n_closed", "n_open")
REPORT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor", "cider")
TRAIN_METRICS = ("loss", "epoch", "step", "samples_per_s", "tokens_per_s", "peak_mem_mb")


class SchedulerConfig(_Section):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: float = Field(2.0, gt=1)
    per: str | None = None
    """A search key (e.g. `method.name`): ASHA compares each trial only with the trials that share its value
    (one bracket per method: it stops a method's weaker learning rates, never a slow-starting method)."""


class SweepConfig(_Section):
    name: str = "sweep"
    train: dict[str, Any] = Field(default_factory=dict)
    train_config: str | None = None
    search: dict[str, Any] = Field(default_factory=dict)
    metric: str = "eval/test/overall_acc"
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
        raw = set_dotted(raw, key[len("sweep."):] if key.startswith("sweep.") else f"train.{key}", value)
    try:
        sweep = SweepConfig.model_validate(raw)
    except Exception as e:  # pydantic.ValidationError
        errors = [_format(err) for err in e.errors()] if hasattr(e, "errors") else [str(e)]
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
    per = sweep.scheduler.per
    if per is not None and per not in sweep.search:
        errors.append(f"scheduler.per: {per!r} is not a search key; search keys: {', '.join(sweep.search) or 'none'}")
    if per is not None and sweep.scheduler.type != "asha":
        errors.append(f"scheduler.per applies to ASHA only (scheduler.type is {sweep.scheduler.type!r})")
    if errors:
        raise ConfigError(errors, source)
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
        eval_sets = [cfg.data.eval_split, *cfg.data.eval_sets, *(["ood"] if cfg.data.path is None
                                                                 and cfg.data.synth_ood_style else [])]
        reported |= expected_metrics(cfg, eval_sets)
    if not errors and sweep.metric not in reported:
        errors.append(f"metric {sweep.metric!r} is reported by no trial; trials report: "
                      + ", ".join(sorted(m for m in reported if not m.startswith("zeroshot/"))))
    if errors:
        raise ConfigError(sorted(set(errors), key=errors.index), source)


# ---- scheduling ----------------------------------------------------------------------------------
def make_scheduler(sweep: SweepConfig, max_t: int) -> Any:
    """Tune's scheduler for the sweep: FIFO, Ray's ASHA, or ASHA with one bracket per `scheduler.per` value."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    if s.per is None:
        return AsyncHyperBandScheduler(time_attr="epoch", max_t=max_t, grace_period=s.grace_period,
                                       reduction_factor=s.reduction_factor)

    class GroupedASHA(AsyncHyperBandScheduler):
        """Ray's ASHA, but each trial joins the bracket of its group: rungs (and cutoffs) per group."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._groups: dict[str, Any] = {}

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            super().on_trial_add(tune_controller, trial)  # checks metric / mode
            group = str(trial.config["overrides"].get(s.per))
            if group not in self._groups:
                self._groups[group] = _Bracket(s.grace_period, max_t, s.reduction_factor, 0)
            self._trial_info[trial.trial_id] = self._groups[group]

        def debug_string(self) -> str:
            return f"ASHA per {s.per}: num_stopped={self._num_stopped}\n" + "\n".join(
                f"{g}: {b.debug_str()}" for g, b in self._groups.items())

    return GroupedASHA(time_attr="epoch", max_t=max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor)


# ---- the trial -----------------------------------------------------------------------------------
def trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one run of the recipe on a Ray Train `TorchTrainer`."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    data = config["base"]
    for key, value in config["overrides"].items():
        data = set_dotted(data, key, value)
    trial_name = f"trial-{ray.tune.get_context().get_trial_id()}"
    data = set_dotted(data, "run.name", trial_name)
    cfg = validate(data, trial_name)
    t0 = time.time()
    trainer = build_trainer(cfg, storage=config["storage"], extra_callbacks=[TuneReportCallback()])
    result = trainer.fit()
    write_result(result, summarize(cfg, result, time.time() - t0))


def _search_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    grid, sampled = _space(sweep)
    space: dict[str, Any] = {k: tune.grid_search(v) for k, v in grid.items()}
    for key, spec in sampled.items():
        kind, args = next(iter(spec.items()))
        space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return space


def trial_cpus(base_cfg: Config, sweep: SweepConfig) -> float:
    return sweep.trial_cpus + required_cpus(base_cfg)


def concurrent_trials(cluster: dict[str, float], base_cfg: Config, sweep: SweepConfig) -> int:
    """Trials the cluster holds at once: by CPUs, and by GPUs (fractional GPUs pack several on one)."""
    n = int(cluster.get("CPU", 0) // trial_cpus(base_cfg, sweep))
    if base_cfg.scaling.use_gpu and cluster.get("GPU"):
        n = min(n, int(cluster["GPU"] / (base_cfg.scaling.num_workers * base_cfg.scaling.gpus_per_worker) + 1e-9))
    return max(1, n)


def run_sweep(sweep: SweepConfig, base: dict[str, Any], out: str | Path, resume: bool = False) -> Any:
    """Run (or resume) the sweep in `out` (a folder or URI); returns Tune's ResultGrid."""
    import ray
    from ray import tune

    base_cfg = validate(base)
    out = store.resolve(out)
    check_storage(base_cfg, store.join(out, sweep.name, "runs"))
    need = trial_cpus(base_cfg, sweep)
    init_ray(2 * need)  # a local cluster runs two trials side by side
    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    if cluster_cpus < need and not os.environ.get("RAYMED_AUTOSCALING"):
        raise ResourceError(f"each trial needs {need:g} CPUs (driver {sweep.trial_cpus:g} + "
                            f"{base_cfg.scaling.num_workers} workers x {base_cfg.scaling.cpus_per_worker:g} + data) "
                            f"but the cluster has {cluster_cpus:g}; lower scaling.cpus_per_worker or num_workers")
    if base_cfg.scaling.use_gpu and not ray.cluster_resources().get("GPU") and not os.environ.get("RAYMED_AUTOSCALING"):
        raise ResourceError("scaling.use_gpu=true but the cluster has no GPU (set RAYMED_AUTOSCALING=1 if it "
                            "autoscales GPU nodes)")
    concurrency = sweep.max_concurrent or concurrent_trials(ray.cluster_resources(), base_cfg, sweep)
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
            param_space={"base": base, "overrides": _search_space(sweep), "storage": store.join(out, sweep.name, "runs")},
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                        num_samples=sweep.num_samples, max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage, storage_filesystem=fs),
        )
    print(f"[raymed] sweep {sweep.name}: {len(points(sweep)) * sweep.num_samples} trials, "
          f"{concurrency} at a time, metric {sweep.metric} ({sweep.mode}) -> {out}", flush=True)
    return tuner.fit()


def rows_from_results(results: Any, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One report row per trial that reported, from Tune's results (stopped trials included)."""
    rows = []
    for r in results:
        m = dict(r.metrics or {})
        if "epoch" not in m:
            continue  # errored before its first report
        data = base
        for key, value in r.config["overrides"].items():
            data = set_dotted(data, key, value)
        cfg = validate(data)
        rows.append({
            "trial_id": m.get("trial_id") or r.path.rsplit("/", 1)[-1],
            "model": cfg.model.name,
            "method": cfg.method.name,
            "towers": cfg.method.towers,
            "lr": cfg.train.lr,
            "overrides": r.config["overrides"],
            "params": {"trainable": m["trainable"], "total": m["total_params"],
                       "percent": 100.0 * m["trainable"] / m["total_params"]},
            "metrics": {k: v for k, v in m.items() if k.startswith(("eval/", "zeroshot/")) or k == "loss"},
            "epochs": m["epoch"],
            "steps": m.get("step"),
            "wall_s": m.get("time_total_s"),
            "peak_mem_mb": m.get("peak_mem_mb"),
            "samples_per_s": m.get("samples_per_s"),
            "stopped_early": m["epoch"] < cfg.train.epochs and r.error is None,
            "error": str(r.error) if r.error else None,
            "config_hash": cfg.hash(),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymed.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help=f"sweep YAML (default: the built-in {DEFAULT_SWEEP.name})")
    ap.add_argument("--out", help="experiment folder or URI: s3://BUCKET/PREFIX, gs://... (default: the sweep's "
                    "run.storage when it sets one, else ./experiments)")
    ap.add_argument("--resume", action="store_true", help="resume an interrupted sweep in --out")
    ap.add_argument("overrides", nargs="*", help="dotted overrides: training keys, or sweep.KEY=VALUE")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after --out / --resume
    from .report import build_report

    try:
        sweep, base = load_sweep(args.config, args.overrides)
        root = args.out or base.get("run", {}).get("storage") or "experiments"
        out = store.join(store.resolve(root), sweep.name)
        results = run_sweep(sweep, base, root, resume=args.resume)
    except (ConfigError, ResourceError, store.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = rows_from_results(results, base)
    errored = [r for r in results if r.error is not None]
    if not rows:
        print(f"error: no trial reported a result ({len(errored)} errored); see {out}", file=sys.stderr)
        return 1
    paths = build_report(rows, out, metric=sweep.metric, mode=sweep.mode)
    print(store.read_text(paths["report_md"]))
    print(f"[raymed] report: {', '.join(str(p) for p in paths.values())}")
    if errored:
        print(f"warning: {len(errored)} trial(s) errored: " + "; ".join(str(r.error)[:200] for r in errored),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
